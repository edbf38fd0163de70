//! Clients of `/ws/presence/{room}` that keep a readable transcript, shared
//! by the in-process tests and the tests with real server processes.
//!
//! Every frame is JSON; the transcript shows it with each `epoch` (random
//! per room) replaced by `<epoch>`, so snapshots are the same on every run.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum_channels::testing::{Received, TestClient, Transcript};
use serde_json::Value;

/// A transcript several clients write to.
#[derive(Clone, Default)]
pub struct Log(Arc<Mutex<Vec<String>>>);

impl Log {
    /// Adds a line; a long one becomes `start… (N bytes)`.
    pub fn push(&self, line: String) {
        let line = if line.chars().count() > 600 {
            let start: String = line.chars().take(80).collect();
            format!("{start}… ({} bytes)", line.len())
        } else {
            line
        };
        self.0.lock().unwrap().push(line);
    }

    /// A line of the test's own.
    pub fn note(&self, line: &str) {
        self.push(format!("# {line}"));
    }

    pub fn text(&self) -> String {
        let mut text = self.0.lock().unwrap().join("\n");
        text.push('\n');
        text
    }
}

/// One connection to a room.
pub struct Member {
    pub label: String,
    inner: TestClient,
    log: Log,
    /// The position of the last message this client was sent.
    pub last: Option<(u64, String)>,
}

/// `value` with every `epoch` replaced, for the transcript.
fn hide_epochs(value: &mut Value) {
    match value {
        Value::Object(map) => {
            for (key, inner) in map.iter_mut() {
                if key == "epoch" {
                    *inner = Value::from("<epoch>");
                } else {
                    hide_epochs(inner);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(hide_epochs),
        _ => {}
    }
}

/// `path` with the value of its `epoch=` replaced.
fn hide_epoch_in(path: &str) -> String {
    match path.split_once("epoch=") {
        None => path.to_owned(),
        Some((before, after)) => {
            let rest = after.find('&').map_or("", |end| &after[end..]);
            format!("{before}epoch=<epoch>{rest}")
        }
    }
}

impl Member {
    /// Connects to `base` (`ws://host:port`) at `path` (with its query).
    pub async fn connect(base: &str, label: &str, path: &str, log: &Log) -> Member {
        log.push(format!("{label} connect {}", hide_epoch_in(path)));
        let inner = TestClient::connect_url(
            &format!("{base}{path}"),
            label,
            path,
            &Transcript::default(),
        )
        .await
        .unwrap_or_else(|status| panic!("{label}: handshake refused with {status}"));
        Member {
            label: label.to_owned(),
            inner,
            log: log.clone(),
            last: None,
        }
    }

    pub fn set_timeout(&mut self, timeout: Duration) {
        self.inner.set_timeout(timeout);
    }

    /// The next frame: a JSON object, or a close (`{"close": code,
    /// "reason": …}`).
    pub async fn recv(&mut self) -> Value {
        let received = self.inner.recv().await;
        let text = match received {
            Received::Text(text) => text,
            other => {
                self.log.push(format!("{} < {other}", self.label));
                return match other {
                    Received::Close { code, reason } => {
                        serde_json::json!({"close": code, "reason": reason})
                    }
                    _ => Value::Null,
                };
            }
        };
        let value: Value = serde_json::from_str(&text)
            .unwrap_or_else(|err| panic!("{}: not JSON ({err}): {text}", self.label));
        let mut shown = value.clone();
        hide_epochs(&mut shown);
        self.log.push(format!("{} < {shown}", self.label));
        let messages = match value["type"].as_str() {
            Some("message") => vec![value.clone()],
            Some("history") => value["messages"].as_array().cloned().unwrap_or_default(),
            _ => Vec::new(),
        };
        for message in messages {
            let offset = message["offset"].as_u64().expect("a message has an offset");
            let epoch = message["epoch"].as_str().expect("a message has an epoch");
            self.last = Some((offset, epoch.to_owned()));
        }
        value
    }

    /// The next frame, which must be of `kind`.
    pub async fn expect(&mut self, kind: &str) -> Value {
        let frame = self.recv().await;
        assert_eq!(frame["type"], kind, "{}: {frame}", self.label);
        frame
    }

    /// Waits for the `presence_state` and the `history` of a new
    /// connection.
    pub async fn joined(&mut self) -> (Value, Value) {
        let state = self.expect("presence_state").await;
        let history = self.expect("history").await;
        (state, history)
    }

    /// Waits for a diff; returns its joins and leaves.
    pub async fn diff(&mut self) -> (Vec<String>, Vec<String>) {
        let frame = self.expect("presence_diff").await;
        let names = |key: &str| -> Vec<String> {
            frame[key]
                .as_array()
                .unwrap()
                .iter()
                .map(|name| name.as_str().unwrap().to_owned())
                .collect()
        };
        (names("joins"), names("leaves"))
    }

    pub async fn say(&mut self, text: &str) {
        let frame = serde_json::json!({"type": "message", "text": text}).to_string();
        self.send_text(&frame).await;
    }

    pub async fn send_text(&mut self, text: &str) {
        self.log.push(format!("{} > {text}", self.label));
        self.inner.send_text(text).await;
    }

    pub async fn expect_silence(&mut self, window: Duration) {
        self.inner.expect_silence(window).await;
    }

    /// Closes cleanly and waits for the server's reply.
    pub async fn close(self) {
        self.log.push(format!("{} > [close 1000]", self.label));
        let reply = self.inner.close(1000).await;
        self.log.push(format!("{} < {reply}", self.label));
    }

    /// Drops the connection without a close frame.
    pub fn vanish(self) {
        self.log
            .push(format!("{} > [TCP connection dropped]", self.label));
        self.inner.drop_connection();
    }
}

// ANCHOR: members
/// What a client believes about the room's members, built only from the
/// frames it gets, by the protocol's rule: a name's change is applied only
/// if its diff's version is above the one held for that name (from an
/// earlier diff, or else from the `presence_state`). Diffs sent by two
/// servers may arrive in either order; versions make the result the same.
#[derive(Debug, Default)]
pub struct Members {
    /// The version of the `presence_state`.
    state_version: u64,
    /// name → (the version of what we know of it, whether it is here).
    names: BTreeMap<String, (u64, bool)>,
}

impl Members {
    /// Takes in a `presence_state` or a `presence_diff`; ignores other frames.
    pub fn apply(&mut self, frame: &serde_json::Value) {
        let Some(version) = frame["version"].as_u64() else {
            return;
        };
        match frame["type"].as_str() {
            Some("presence_state") => {
                self.state_version = version;
                for name in frame["members"].as_array().unwrap() {
                    self.names
                        .insert(name.as_str().unwrap().to_owned(), (version, true));
                }
            }
            Some("presence_diff") => {
                for (key, here) in [("joins", true), ("leaves", false)] {
                    for name in frame[key].as_array().unwrap() {
                        let name = name.as_str().unwrap().to_owned();
                        let held = self.names.get(&name).map_or(self.state_version, |e| e.0);
                        if version > held {
                            self.names.insert(name, (version, here));
                        }
                    }
                }
            }
            _ => {}
        }
    }

    /// The names here now.
    pub fn present(&self) -> BTreeSet<String> {
        self.names
            .iter()
            .filter(|(_, (_, here))| *here)
            .map(|(name, _)| name.clone())
            .collect()
    }
}
// ANCHOR_END: members
