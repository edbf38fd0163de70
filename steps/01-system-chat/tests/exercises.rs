//! The solution to chapter 1's exercise, checked: an echo that says when
//! the server heard each message. The chapter shows it folded, below its
//! hints; your own solution belongs in `src/system_chat.rs`.
//!
//! The consumer is written here, beside the step's own `SystemChat`, so
//! that the solution is compiled and tested without changing the step.

use std::time::{SystemTime, UNIX_EPOCH};

use axum::Router;
use axum_channels::testing::TestServer;
use axum_channels::{Consumer, Frame, NoEvents, Result, Scope, Socket, route};

// ANCHOR: time_of_day
/// The current time of day in UTC, as HH:MM:SS.
fn utc_time_of_day() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs());
    let (hours, minutes, seconds) = (secs / 3600 % 24, secs / 60 % 60, secs % 60);
    format!("{hours:02}:{minutes:02}:{seconds:02}")
}
// ANCHOR_END: time_of_day

/// `SystemChat`, with the time in front of each echo.
struct StampedEcho;

impl Consumer for StampedEcho {
    type Event = NoEvents;

    fn new(_scope: &Scope) -> Self {
        StampedEcho
    }

    async fn connect(&mut self, socket: &mut Socket) -> Result<()> {
        socket.accept().await?;
        socket.send_text("🔧 System: Connection established!").await
    }

    // ANCHOR: receive
    async fn receive(&mut self, socket: &mut Socket, frame: Frame) -> Result<()> {
        match frame {
            Frame::Text(text) => {
                let reply = format!("[{} UTC] 🔧 System Echo: {text}", utc_time_of_day());
                socket.send_text(reply).await
            }
            Frame::Binary(_) => socket.send_text("🔧 System: text only, please").await,
        }
    }
    // ANCHOR_END: receive
}

/// True for `HH:MM:SS` with a valid hour, minute and second.
fn is_time_of_day(text: &str) -> bool {
    let parts: Vec<&str> = text.split(':').collect();
    let limits = [24, 60, 60];
    parts.len() == 3
        && parts.iter().zip(limits).all(|(part, limit)| {
            part.len() == 2 && part.parse::<u32>().is_ok_and(|value| value < limit)
        })
}

#[tokio::test]
async fn each_echo_says_when_the_server_heard_it() {
    let app = Router::new().route("/ws/system", route::<StampedEcho>());
    let server = TestServer::start(app).await;
    let mut client = server.connect("/ws/system").await;
    assert_eq!(
        client.recv_text().await,
        "🔧 System: Connection established!"
    );
    client.send_text("hi").await;
    let reply = client.recv_text().await;
    let (stamp, rest) = reply
        .strip_prefix('[')
        .and_then(|reply| reply.split_once(" UTC] "))
        .unwrap_or_else(|| panic!("no [HH:MM:SS UTC] in front: {reply:?}"));
    assert!(is_time_of_day(stamp), "{stamp:?} is not HH:MM:SS");
    assert_eq!(rest, "🔧 System Echo: hi");
}

#[test]
fn the_time_of_day_is_well_formed() {
    assert!(is_time_of_day(&utc_time_of_day()));
    for bad in ["24:00:00", "12:60:00", "1:02:03", "12:00", "ab:cd:ef"] {
        assert!(!is_time_of_day(bad), "{bad}");
    }
}
