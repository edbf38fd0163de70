//! The consumer lifecycle as a client sees it, and as the consumer sees it.
//!
//! `Probe` reports each lifecycle call to the test that opened the
//! connection, so every test can assert both sides: the frames on the wire and
//! the calls the consumer got, including the close code `disconnect` saw.

use std::collections::HashMap;
use std::sync::{LazyLock, Mutex};
use std::time::Duration;

use axum::Router;
use axum_channels::testing::{Received, TestServer, Transcript};
use axum_channels::{Consumer, Error, Frame, NoEvents, Result, Scope, Socket, route};
use tokio::sync::mpsc;

type Events = mpsc::UnboundedReceiver<String>;

/// Where each probe reports, by the `{id}` of its path.
static REPORTS: LazyLock<Mutex<HashMap<String, mpsc::UnboundedSender<String>>>> =
    LazyLock::new(Mutex::default);

fn watch(id: &str) -> Events {
    let (tx, rx) = mpsc::unbounded_channel();
    REPORTS.lock().unwrap().insert(id.to_owned(), tx);
    rx
}

/// A consumer whose behaviour is chosen by its path: `/{mode}/{id}`.
struct Probe {
    mode: String,
    id: String,
}

impl Probe {
    fn report(&self, event: String) {
        if let Some(tx) = REPORTS.lock().unwrap().get(&self.id) {
            let _ = tx.send(event);
        }
    }
}

impl Consumer for Probe {
    type Event = NoEvents;
    const MAX_MESSAGE_SIZE: usize = 16;

    fn new(scope: &Scope) -> Self {
        Probe {
            mode: scope.param("mode").unwrap_or_default().to_owned(),
            id: scope.param("id").unwrap_or_default().to_owned(),
        }
    }

    async fn connect(&mut self, socket: &mut Socket) -> Result<()> {
        self.report("connect".into());
        match self.mode.as_str() {
            "refuse" => socket.close(4003, "not today").await,
            "silent" => Ok(()),
            "fail" => Err(Error::Other("connect broke".into())),
            "kick" => {
                socket.accept().await?;
                socket.send_text("welcome").await?;
                socket.close(4001, "you are not on the list").await
            }
            _ => {
                socket.accept().await?;
                socket.send_text("welcome").await
            }
        }
    }

    async fn receive(&mut self, socket: &mut Socket, frame: Frame) -> Result<()> {
        self.report(format!("receive {frame:?}"));
        match frame {
            Frame::Text(text) if text == "bye" => socket.close(4000, "as you wish").await,
            Frame::Text(text) if text == "boom" => Err(Error::Other("boom".into())),
            Frame::Text(text) if text == "panic" => panic!("a bug in the consumer"),
            Frame::Text(text) => socket.send_text(format!("echo: {text}")).await,
            Frame::Binary(bytes) => socket.send_bytes(bytes).await,
        }
    }

    async fn disconnect(&mut self, socket: &mut Socket, code: u16) {
        let can_send = socket.send_text("too late").await.is_ok();
        self.report(format!("disconnect {code} (can send: {can_send})"));
    }
}

async fn server() -> TestServer {
    TestServer::start(Router::new().route("/{mode}/{id}", route::<Probe>())).await
}

async fn next(events: &mut Events) -> String {
    tokio::time::timeout(Duration::from_secs(5), events.recv())
        .await
        .expect("an event within 5 s")
        .expect("the probe is still reporting")
}

#[tokio::test]
async fn a_clean_conversation_calls_each_method_in_order() {
    let server = server().await;
    let mut events = watch("clean");
    let mut client = server.connect("/echo/clean").await;
    assert_eq!(client.recv_text().await, "welcome");
    client.send_text("hi").await;
    assert_eq!(client.recv_text().await, "echo: hi");
    client.send_bytes(&[0, 1, 2]).await;
    assert_eq!(client.recv().await, Received::Binary(vec![0, 1, 2]));
    assert_eq!(
        client.close(1000).await,
        Received::Close {
            code: 1000,
            reason: String::new()
        }
    );

    assert_eq!(next(&mut events).await, "connect");
    assert_eq!(next(&mut events).await, r#"receive Text("hi")"#);
    assert_eq!(
        next(&mut events).await,
        "receive Binary(b\"\\0\\x01\\x02\")"
    );
    assert_eq!(next(&mut events).await, "disconnect 1000 (can send: false)");
}

#[tokio::test]
async fn a_vanished_client_still_gets_disconnect_with_1006() {
    let server = server().await;
    let mut events = watch("vanish");
    let mut client = server.connect("/echo/vanish").await;
    client.recv_text().await;
    client.drop_connection();
    assert_eq!(next(&mut events).await, "connect");
    assert_eq!(next(&mut events).await, "disconnect 1006 (can send: false)");
}

#[tokio::test]
async fn an_oversized_message_closes_with_1009_and_says_the_limit() {
    let server = server().await;
    let mut events = watch("big");
    let mut client = server.connect("/echo/big").await;
    client.recv_text().await;
    client.send_text("sixteen bytes ok").await;
    assert_eq!(client.recv_text().await, "echo: sixteen bytes ok");
    client.send_text("seventeen bytes!!").await;
    assert_eq!(
        client.recv().await,
        Received::Close {
            code: 1009,
            reason: "message too big: the limit is 16 bytes".into()
        }
    );
    assert_eq!(next(&mut events).await, "connect");
    assert_eq!(
        next(&mut events).await,
        r#"receive Text("sixteen bytes ok")"#
    );
    assert_eq!(next(&mut events).await, "disconnect 1009 (can send: false)");
}

#[tokio::test]
async fn closing_before_accept_refuses_the_handshake_with_403() {
    let server = server().await;
    let mut events = watch("refuse");
    let transcript = Transcript::default();
    let refused = server
        .try_connect_as("", "/refuse/refuse", &transcript)
        .await;
    assert_eq!(refused.err().map(|status| status.as_u16()), Some(403));
    assert_eq!(next(&mut events).await, "connect");
    // The 403 is sent once the handler has returned, and a refused client was
    // never connected: there is nothing left that could call `disconnect`.
    assert!(events.try_recv().is_err());
}

#[tokio::test]
async fn never_accepting_refuses_and_a_failing_connect_is_a_server_error() {
    let server = server().await;
    let transcript = Transcript::default();
    let silent = server.try_connect_as("", "/silent/x", &transcript).await;
    assert_eq!(silent.err().map(|status| status.as_u16()), Some(403));
    let failed = server.try_connect_as("", "/fail/x", &transcript).await;
    assert_eq!(failed.err().map(|status| status.as_u16()), Some(500));
}

#[tokio::test]
async fn accept_then_close_in_connect_delivers_the_frames_then_the_reason() {
    let server = server().await;
    let mut events = watch("kick");
    let mut client = server.connect("/kick/kick").await;
    assert_eq!(client.recv_text().await, "welcome");
    assert_eq!(
        client.recv().await,
        Received::Close {
            code: 4001,
            reason: "you are not on the list".into()
        }
    );
    drop(client);
    assert_eq!(next(&mut events).await, "connect");
    assert_eq!(next(&mut events).await, "disconnect 4001 (can send: false)");
}

#[tokio::test]
async fn a_consumer_may_close_from_receive() {
    let server = server().await;
    let mut events = watch("bye");
    let mut client = server.connect("/echo/bye").await;
    client.recv_text().await;
    client.send_text("bye").await;
    assert_eq!(
        client.recv().await,
        Received::Close {
            code: 4000,
            reason: "as you wish".into()
        }
    );
    drop(client);
    assert_eq!(next(&mut events).await, "connect");
    assert_eq!(next(&mut events).await, r#"receive Text("bye")"#);
    assert_eq!(next(&mut events).await, "disconnect 4000 (can send: false)");
}

#[tokio::test]
async fn a_panicking_consumer_is_closed_with_1011_and_still_disconnected() {
    let server = server().await;
    let mut events = watch("panic");
    let mut broken = server.connect("/echo/panic").await;
    let mut bystander = server.connect("/echo/bystander-of-panic").await;
    broken.recv_text().await;
    bystander.recv_text().await;

    broken.send_text("panic").await;
    assert_eq!(
        broken.recv().await,
        Received::Close {
            code: 1011,
            reason: "internal error".into()
        }
    );
    drop(broken);
    assert_eq!(next(&mut events).await, "connect");
    assert_eq!(next(&mut events).await, r#"receive Text("panic")"#);
    assert_eq!(next(&mut events).await, "disconnect 1011 (can send: false)");
    bystander.send_text("still here?").await;
    assert_eq!(bystander.recv_text().await, "echo: still here?");
}

#[tokio::test]
async fn a_failing_consumer_closes_only_its_own_connection_with_1011() {
    let server = server().await;
    let mut broken = server.connect("/echo/boom").await;
    let mut bystander = server.connect("/echo/bystander").await;
    broken.recv_text().await;
    bystander.recv_text().await;

    broken.send_text("boom").await;
    assert_eq!(
        broken.recv().await,
        Received::Close {
            code: 1011,
            reason: "internal error".into()
        }
    );
    bystander.send_text("still here?").await;
    assert_eq!(bystander.recv_text().await, "echo: still here?");
}
