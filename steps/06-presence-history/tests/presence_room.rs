//! `/ws/presence/{room}` in one process, on the in-memory backends: the
//! protocol as snapshot transcripts (presence state and diffs, history on
//! join, recovery, refusals), and two tabs of one name as one member.
//!
//! Presence diffs go out on a timer (`PRESENCE_FLUSH_MS`, 20 ms here), so
//! each test waits for the diff it expects before its next step: the
//! transcripts come in one order on every run.

mod rooms;

use std::time::Duration;

use axum_channels::Runtime;
use axum_channels::room::PresenceConfig;
use axum_channels::testing::TestServer;
use insta::assert_snapshot;
use rooms::{Log, Member};
use step_06_presence_history::{Backends, Config, app_with};

/// Long enough for a stray frame to show up.
const QUIET: Duration = Duration::from_millis(150);

/// The app with a history of 5 messages and quick presence diffs.
async fn start() -> (TestServer, String) {
    let config = Config {
        history_size: 5,
        presence: PresenceConfig {
            flush: Duration::from_millis(20),
            ..PresenceConfig::default()
        },
        ..Config::default()
    };
    let server =
        TestServer::start(app_with(Backends::in_memory(&config, &Runtime::default()))).await;
    let base = format!("ws://{}", server.addr());
    (server, base)
}

#[tokio::test]
async fn two_members_see_each_other_and_talk() {
    let (_server, base) = start().await;
    let log = Log::default();
    let mut alice = Member::connect(&base, "alice", "/ws/presence/lobby?name=alice", &log).await;
    alice.joined().await;
    assert_eq!(alice.diff().await, (vec!["alice".into()], vec![]));
    let mut bob = Member::connect(&base, "bob", "/ws/presence/lobby?name=bob", &log).await;
    let (state, _) = bob.joined().await;
    assert_eq!(state["members"], serde_json::json!(["alice", "bob"]));
    alice.diff().await;
    bob.diff().await;
    alice.say("hi bob").await;
    alice.expect("message").await;
    bob.expect("message").await;
    bob.say("hi alice").await;
    alice.expect("message").await;
    bob.expect("message").await;
    bob.close().await;
    assert_eq!(alice.diff().await, (vec![], vec!["bob".into()]));
    alice.expect_silence(QUIET).await;
    assert_snapshot!("two_members_see_each_other_and_talk", log.text());
}

#[tokio::test]
async fn a_new_member_gets_the_history_then_live_messages() {
    let (_server, base) = start().await;
    let log = Log::default();
    let mut alice = Member::connect(&base, "alice", "/ws/presence/lobby?name=alice", &log).await;
    alice.joined().await;
    alice.diff().await;
    for text in ["one", "two", "three"] {
        alice.say(text).await;
        alice.expect("message").await;
    }
    let mut carol = Member::connect(&base, "carol", "/ws/presence/lobby?name=carol", &log).await;
    let (_, history) = carol.joined().await;
    assert_eq!(history["messages"].as_array().unwrap().len(), 3);
    alice.diff().await;
    carol.diff().await;
    alice.say("four").await;
    alice.expect("message").await;
    let four = carol.expect("message").await;
    assert_eq!(four["offset"], 4);
    assert_snapshot!(
        "a_new_member_gets_the_history_then_live_messages",
        log.text()
    );
}

#[tokio::test]
async fn a_client_that_comes_back_gets_what_it_missed() {
    let (_server, base) = start().await;
    let log = Log::default();
    let mut alice = Member::connect(&base, "alice", "/ws/presence/lobby?name=alice", &log).await;
    alice.joined().await;
    alice.diff().await;
    let mut bob = Member::connect(&base, "bob", "/ws/presence/lobby?name=bob", &log).await;
    bob.joined().await;
    alice.diff().await;
    bob.diff().await;
    alice.say("before").await;
    alice.expect("message").await;
    bob.expect("message").await;
    let (offset, epoch) = bob.last.clone().unwrap();
    log.note("bob's connection drops; alice says two things");
    bob.vanish();
    alice.diff().await;
    alice.say("while you were away").await;
    alice.expect("message").await;
    alice.say("and this").await;
    alice.expect("message").await;
    let path = format!("/ws/presence/lobby?name=bob&offset={offset}&epoch={epoch}");
    let mut bob = Member::connect(&base, "bob", &path, &log).await;
    let (_, history) = bob.joined().await;
    assert_eq!(history["recovered"], true);
    let texts: Vec<&str> = history["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["text"].as_str().unwrap())
        .collect();
    assert_eq!(texts, ["while you were away", "and this"]);
    alice.diff().await;
    bob.diff().await;
    log.note("too late: 6 more messages, and the history keeps 5");
    for n in 1..=6 {
        alice.say(&format!("message {n}")).await;
        alice.expect("message").await;
        bob.expect("message").await;
    }
    let path = format!("/ws/presence/lobby?name=dave&offset={offset}&epoch={epoch}");
    let mut dave = Member::connect(&base, "dave", &path, &log).await;
    let (_, history) = dave.joined().await;
    assert_eq!(history["recovered"], false);
    assert_eq!(history["messages"].as_array().unwrap().len(), 5);
    log.note("erin asks with an epoch this room never had");
    let path = "/ws/presence/lobby?name=erin&offset=1&epoch=another";
    let mut erin = Member::connect(&base, "erin", path, &log).await;
    let (_, history) = erin.joined().await;
    assert_eq!(history["recovered"], false);
    assert_snapshot!("a_client_that_comes_back_gets_what_it_missed", log.text());
}

#[tokio::test]
async fn two_tabs_of_one_name_are_one_member() {
    let (_server, base) = start().await;
    let log = Log::default();
    let mut bob = Member::connect(&base, "bob", "/ws/presence/lobby?name=bob", &log).await;
    bob.joined().await;
    bob.diff().await;
    let path = "/ws/presence/lobby?name=alice";
    let mut tab1 = Member::connect(&base, "alice-tab-1", path, &log).await;
    tab1.joined().await;
    bob.diff().await;
    tab1.diff().await;
    let mut tab2 = Member::connect(&base, "alice-tab-2", path, &log).await;
    let (state, _) = tab2.joined().await;
    assert_eq!(state["members"], serde_json::json!(["alice", "bob"]));
    log.note("a second tab is no join");
    bob.expect_silence(QUIET).await;
    tab1.close().await;
    log.note("closing one tab is no leave");
    bob.expect_silence(QUIET).await;
    tab2.close().await;
    assert_eq!(bob.diff().await, (vec![], vec!["alice".into()]));
    assert_snapshot!("two_tabs_of_one_name_are_one_member", log.text());
}

#[tokio::test]
async fn bad_names_positions_and_messages_are_refused_clearly() {
    let (_server, base) = start().await;
    let log = Log::default();
    for path in [
        "/ws/presence/lobby",
        "/ws/presence/lobby?name=",
        "/ws/presence/lobby?name=a%0Ab",
        "/ws/presence/lobby?name=someone-whose-name-is-far-too-long-for-this",
        "/ws/presence/lobby?name=alice&offset=abc&epoch=x",
        "/ws/presence/lobby?name=alice&offset=3",
        &format!("/ws/presence/{}?name=alice", "r".repeat(65)),
    ] {
        let mut refused = Member::connect(&base, "client", path, &log).await;
        let close = refused.recv().await;
        assert!(close["close"].as_u64().unwrap() >= 4001, "{path}: {close}");
    }
    let mut alice = Member::connect(&base, "alice", "/ws/presence/lobby?name=alice", &log).await;
    alice.joined().await;
    alice.diff().await;
    for bad in [
        "not json",
        r#"{"type": "shout", "text": "hi"}"#,
        r#"{"type": "message"}"#,
        r#"{"type": "message", "text": "   "}"#,
    ] {
        alice.send_text(bad).await;
        alice.expect("error").await;
    }
    alice.say(&"x".repeat(1001)).await;
    alice.expect("error").await;
    alice.say("still here").await;
    alice.expect("message").await;
    assert_snapshot!(
        "bad_names_positions_and_messages_are_refused_clearly",
        log.text()
    );
}
