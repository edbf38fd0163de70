//! What every channel layer must do, whatever its backend.
//!
//! The suite is written once, as generic async checks in [`checks`] that take
//! a [`Backend`]: something that builds a fresh layer with the given
//! [`Limits`], plus the backend's [`Capabilities`]. The
//! [`conformance_tests!`] macro turns every check into one `#[tokio::test]`
//! inside a module named for the backend, so every backend runs exactly the
//! same checks and a failure reads `redis_queue::group_send_reaches_every_member`.
//!
//! Three backends run it, at the bottom of this file: `memory`
//! ([`InMemoryLayer`]), and with the `redis` feature `redis_queue`
//! ([`RedisLayer`]) and `redis_pubsub` ([`RedisPubSubLayer`]), each test on a
//! redis-server of its own (see `channels_testkit::RedisServer`;
//! without redis-server installed those tests say loudly that they were
//! skipped, and fail under `CI=true`). To add a backend, add a constructor
//! on [`Backend`] and one `conformance_tests!` line.
//!
//! Where a layer kind differs **by design** (pub/sub keeps nothing: no
//! capacity on the wire, nothing kept for a channel nobody listens to, no
//! expiry, memberships local to the process), its [`Capabilities`] say so,
//! and the check concerned asserts the documented behaviour instead, and
//! prints the difference on stderr ([`note`]); nothing is skipped silently.
//! `documented_differences` prints each backend's table.
//!
//! How the checks avoid timing:
//! - "nothing more arrives on this channel" is checked by sending a sentinel
//!   message and requiring that it is the very next message received
//!   ([`assert_nothing_queued`]), which needs no clock and works the same
//!   over a network;
//! - a receive that should succeed is guarded by a generous timeout, so a
//!   broken backend fails instead of hanging;
//! - the expiry checks run on tokio's paused clock and
//!   `tokio::time::advance` for a backend whose expiry follows tokio's clock
//!   (in-memory). Redis expires on its own clock, in whole seconds, so the
//!   Redis queue layer runs real-time variants with expiries of 1 and 2 s
//!   (the only real waits in the suite, about 3.5 s each).
//!
//! Checks that concern one backend only (e.g. [`InMemoryLayer::size`]) live
//! outside the macro, in `memory_only`; the Redis layers' own are in
//! `tests/redis_layers.rs`.

use std::future::Future;
use std::io::Write;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use axum_channels::layer::{
    ChannelLayer, InMemoryLayer, LayerError, LayerMessage, Layers, MemoryConfig, NameKind,
    validate_channel_name,
};
use serde_json::json;
use tokio::time::timeout;

/// The limits a check asks its backend for.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Messages a channel may hold.
    pub capacity: usize,
    /// How long a message waits to be received before it is dropped.
    pub expiry: Duration,
    /// How long a group membership lasts unless renewed.
    pub group_expiry: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            capacity: 100,
            expiry: Duration::from_secs(60),
            group_expiry: Duration::from_secs(24 * 60 * 60),
        }
    }
}

/// How a backend's messages and memberships expire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expiry {
    /// On tokio's clock, so the checks can pause and advance it.
    TokioClock,
    /// On the server's wall clock, in whole seconds.
    WallClock,
    /// Never, by design.
    Never,
}

/// What a backend does where layer kinds differ by design.
#[derive(Debug, Clone, Copy)]
pub struct Capabilities {
    /// What `new_channel(prefix)` puts in front of `prefix` (the pub/sub
    /// layer puts its own prefix there, as Python does).
    pub name_prefix: &'static str,
    /// `send` refuses a message past the channel's capacity with
    /// `ChannelFull`, and `group_send` skips a full member.
    pub capacity: bool,
    /// A message sent to a channel before anyone receives on it waits for
    /// the first receiver.
    pub keeps_unreceived: bool,
    /// How messages expire.
    pub expiry: Expiry,
    /// How group memberships expire.
    pub group_expiry: Expiry,
    /// A message is in its receiver's buffer by the time `send` returns.
    /// Not on a Redis Cluster's pub/sub, which publishes on one connection
    /// and hears on others: the message follows a moment later.
    pub delivered_on_return: bool,
}

/// A layer as the checks use it.
type Layer = Arc<dyn ChannelLayer>;

type Build = Box<dyn Fn(Limits) -> Pin<Box<dyn Future<Output = Layer> + Send>> + Send + Sync>;

/// One backend under test: how to build its layers, and what it promises.
pub struct Backend {
    /// The module name, for notes.
    name: &'static str,
    caps: Capabilities,
    build: Build,
    /// Keeps the backend's server (or cluster) alive for the test.
    #[cfg(feature = "redis")]
    _server: Option<Box<dyn std::any::Any + Send + Sync>>,
}

impl Backend {
    /// A fresh layer with the given limits.
    async fn layer(&self, limits: Limits) -> Layer {
        (self.build)(limits).await
    }

    fn memory() -> Backend {
        Backend {
            name: "memory",
            caps: Capabilities {
                name_prefix: "",
                capacity: true,
                keeps_unreceived: true,
                expiry: Expiry::TokioClock,
                group_expiry: Expiry::TokioClock,
                delivered_on_return: true,
            },
            build: Box::new(|limits| {
                Box::pin(async move {
                    Arc::new(InMemoryLayer::new(
                        MemoryConfig::default()
                            .with_capacity(limits.capacity)
                            .with_expiry(limits.expiry)
                            .with_group_expiry(limits.group_expiry),
                    )) as Layer
                })
            }),
            #[cfg(feature = "redis")]
            _server: None,
        }
    }
}

/// Prints a documented difference of `backend` on stderr, past the test
/// harness's capture, so a reader of the test output sees it.
fn note(backend: &Backend, what: &str) {
    let line = format!("conformance: {}: by design, {what}\n", backend.name);
    let _ = std::io::stderr().write_all(line.as_bytes());
}

/// How long a receive that should succeed may take before the check fails.
const GUARD: Duration = Duration::from_secs(5);

/// A test message: `{"type": "test.message", "n": n}`.
fn message(n: u64) -> LayerMessage {
    json!({"type": "test.message", "n": n})
        .as_object()
        .unwrap()
        .clone()
}

/// The message [`assert_nothing_queued`] sends behind whatever is queued.
fn sentinel() -> LayerMessage {
    json!({"type": "test.sentinel"})
        .as_object()
        .unwrap()
        .clone()
}

/// Receives the next message of `channel`, failing the test if it does not
/// come within [`GUARD`].
async fn recv(layer: &Layer, channel: &str, context: &str) -> LayerMessage {
    match timeout(GUARD, layer.receive(channel)).await {
        Ok(Ok(message)) => message,
        Ok(Err(err)) => panic!("{context}: receive on {channel:?} failed: {err}"),
        Err(_) => panic!("{context}: receive on {channel:?} got nothing within {GUARD:?}"),
    }
}

/// Receives the next message of `channel` and checks it is `expected`.
async fn assert_next(layer: &Layer, channel: &str, expected: &LayerMessage, context: &str) {
    let got = recv(layer, channel, context).await;
    assert_eq!(
        &got, expected,
        "{context}: channel {channel:?} delivered the wrong message"
    );
}

/// Checks that `channel` holds no message: sends a sentinel and requires it
/// to be the next message received. Needs no clock, so it means the same on
/// every backend.
async fn assert_nothing_queued(layer: &Layer, channel: &str, context: &str) {
    layer
        .send(channel, sentinel())
        .await
        .unwrap_or_else(|err| panic!("{context}: sending the sentinel to {channel:?}: {err}"));
    let got = recv(layer, channel, context).await;
    assert_eq!(
        got,
        sentinel(),
        "{context}: channel {channel:?} held a message it should not have"
    );
}

/// A new channel, or a failed test.
async fn channel(layer: &Layer, prefix: &str) -> String {
    layer
        .new_channel(prefix)
        .await
        .unwrap_or_else(|err| panic!("new_channel({prefix:?}) failed: {err}"))
}

/// Lets spawned tasks run until they block.
async fn let_others_run() {
    for _ in 0..20 {
        tokio::task::yield_now().await;
    }
}

/// Spawns a task that receives one message of `channel`.
fn spawn_receive(
    layer: &Layer,
    channel: &str,
) -> tokio::task::JoinHandle<Result<LayerMessage, LayerError>> {
    let layer = Arc::clone(layer);
    let channel = channel.to_owned();
    tokio::spawn(async move { layer.receive(&channel).await })
}

/// Makes sure `ch` is listened to before a check sends to it, on a backend
/// that keeps nothing for a channel nobody receives on (pub/sub): starts a
/// receive, sends numbered probes until it gets one, then takes the probes
/// still on their way. A no-op on other backends.
async fn listen_first(b: &Backend, layer: &Layer, ch: &str) {
    if b.caps.keeps_unreceived {
        return;
    }
    let probe = |n: u64| -> LayerMessage {
        json!({"type": "test.probe", "n": n})
            .as_object()
            .unwrap()
            .clone()
    };
    let mut receiver = spawn_receive(layer, ch);
    let deadline = tokio::time::Instant::now() + GUARD;
    let mut sent = 0;
    let first = loop {
        layer.send(ch, probe(sent)).await.expect("send a probe");
        sent += 1;
        if let Ok(got) = timeout(Duration::from_millis(20), &mut receiver).await {
            break got
                .expect("the receiving task panicked")
                .expect("receive failed");
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{ch:?}: no probe arrived within {GUARD:?}"
        );
    };
    let first = first["n"].as_u64().expect("a probe");
    for n in first + 1..sent {
        assert_next(layer, ch, &probe(n), "a probe on its way").await;
    }
}

/// The checks, each generic over the backend.
mod checks {
    use super::*;

    pub async fn new_channel_names_are_unique_valid_and_prefixed(b: &Backend) {
        let layer = b.layer(Limits::default()).await;
        let mut seen = std::collections::HashSet::new();
        for i in 0..1000 {
            let prefix = if i % 2 == 0 {
                "specific"
            } else {
                "chat.room-1_a"
            };
            let name = channel(&layer, prefix).await;
            assert!(
                validate_channel_name(&name).is_ok(),
                "new_channel({prefix:?}) returned {name:?}, which breaks the naming rules"
            );
            let expected = format!("{}{prefix}", b.caps.name_prefix);
            assert!(
                name.starts_with(&expected),
                "new_channel({prefix:?}) returned {name:?}, which does not start with {expected:?}"
            );
            assert!(
                seen.insert(name.clone()),
                "new_channel returned {name:?} twice (call {i})"
            );
        }
    }

    pub async fn send_then_receive_returns_the_same_message(b: &Backend) {
        let layer = b.layer(Limits::default()).await;
        let ch = channel(&layer, "roundtrip").await;
        let rich: LayerMessage = json!({
            "type": "chat.message",
            "text": "héllo, 世界 \"quoted\" \n newline",
            "nested": {"list": [1, 2.5, -3, null, true], "empty": {}},
            "big": u64::MAX,
        })
        .as_object()
        .unwrap()
        .clone();
        layer.send(&ch, rich.clone()).await.expect("send failed");
        assert_next(&layer, &ch, &rich, "a message must come back unchanged").await;
    }

    pub async fn messages_of_a_channel_arrive_in_order(b: &Backend) {
        let layer = b.layer(Limits::default()).await;
        let ch = channel(&layer, "fifo").await;
        for n in 0..50 {
            layer
                .send(&ch, message(n))
                .await
                .unwrap_or_else(|err| panic!("send #{n} failed: {err}"));
        }
        for n in 0..50 {
            assert_next(
                &layer,
                &ch,
                &message(n),
                &format!("50 messages sent in order, receiving #{n}"),
            )
            .await;
        }
        assert_nothing_queued(&layer, &ch, "all 50 messages were received").await;
    }

    pub async fn receive_waits_until_a_message_arrives(b: &Backend) {
        let layer = b.layer(Limits::default()).await;
        let ch = channel(&layer, "wait").await;
        let receiver = spawn_receive(&layer, &ch);
        let_others_run().await;
        assert!(
            !receiver.is_finished(),
            "receive on an empty channel returned before anything was sent: {:?}",
            receiver.await
        );
        layer.send(&ch, message(7)).await.expect("send failed");
        let got = timeout(GUARD, receiver)
            .await
            .expect("a waiting receive was not woken by a send")
            .expect("the receiving task panicked")
            .expect("receive failed");
        assert_eq!(got, message(7), "the waiting receive got the wrong message");
    }

    pub async fn a_cancelled_receive_loses_nothing(b: &Backend) {
        let layer = b.layer(Limits::default()).await;
        let ch = channel(&layer, "cancel").await;

        // A receive dropped after being polled once, while the channel is empty.
        let polled_once = timeout(Duration::ZERO, layer.receive(&ch)).await;
        assert!(
            polled_once.is_err(),
            "receive on an empty channel returned at once: {polled_once:?}"
        );
        // The same through `select!`, as a consumer's loop would do it.
        tokio::select! {
            biased;
            got = layer.receive(&ch) => panic!("receive on an empty channel returned: {got:?}"),
            () = std::future::ready(()) => {}
        }
        layer.send(&ch, message(1)).await.expect("send failed");
        assert_next(
            &layer,
            &ch,
            &message(1),
            "after two cancelled receives, a new receive must get the message",
        )
        .await;

        // A receive cancelled after the send woke it, but before it ran: the
        // message must go to the other waiting receive (whichever of the two
        // was woken), or have been delivered by the cancelled one.
        for round in 0..2u64 {
            let msg = message(100 + round);
            let first = spawn_receive(&layer, &ch);
            let_others_run().await;
            let second = spawn_receive(&layer, &ch);
            let_others_run().await;
            assert!(
                !first.is_finished() && !second.is_finished(),
                "round {round}: receive on an empty channel returned before anything was sent"
            );
            let (victim, survivor) = if round == 0 {
                (first, second)
            } else {
                (second, first)
            };
            layer.send(&ch, msg.clone()).await.expect("send failed");
            victim.abort();
            let taken_by_victim = match victim.await {
                Ok(Ok(got)) => Some(got),
                Ok(Err(err)) => panic!("round {round}: receive failed: {err}"),
                Err(err) if err.is_cancelled() => None,
                Err(err) => panic!("round {round}: the receiving task panicked: {err}"),
            };
            match taken_by_victim {
                Some(got) => {
                    assert_eq!(got, msg, "round {round}: wrong message");
                    survivor.abort();
                    if let Ok(dup) = survivor.await {
                        panic!("round {round}: one message was received twice: {dup:?}");
                    }
                }
                None => {
                    let got = timeout(GUARD, survivor)
                        .await
                        .unwrap_or_else(|_| {
                            panic!(
                                "round {round}: a receive cancelled after being woken lost the \
                                 message: the other waiting receive never got it"
                            )
                        })
                        .expect("the receiving task panicked")
                        .expect("receive failed");
                    assert_eq!(got, msg, "round {round}: wrong message");
                }
            }
        }
        assert_nothing_queued(&layer, &ch, "every message was received once").await;
    }

    pub async fn channels_are_isolated(b: &Backend) {
        let layer = b.layer(Limits::default()).await;
        let a = channel(&layer, "iso").await;
        let b = channel(&layer, "iso").await;
        layer.send(&a, message(1)).await.expect("send failed");
        assert_nothing_queued(&layer, &b, "a message sent to channel A reached channel B").await;
        assert_next(
            &layer,
            &a,
            &message(1),
            "channel A must still hold its message",
        )
        .await;
    }

    pub async fn group_send_reaches_every_member(b: &Backend) {
        let layer = b.layer(Limits::default()).await;
        let mut members = Vec::new();
        for _ in 0..3 {
            let ch = channel(&layer, "member").await;
            layer
                .group_add("room", &ch)
                .await
                .expect("group_add failed");
            members.push(ch);
        }
        let outsider = channel(&layer, "outsider").await;
        layer
            .group_send("room", message(1))
            .await
            .expect("group_send failed");
        for ch in &members {
            assert_next(
                &layer,
                ch,
                &message(1),
                "every member gets the group message",
            )
            .await;
            assert_nothing_queued(&layer, ch, "a member gets one copy of a group message").await;
        }
        assert_nothing_queued(
            &layer,
            &outsider,
            "a channel outside the group got its message",
        )
        .await;
        layer
            .group_send("empty-group", message(2))
            .await
            .expect("group_send to a group without members must succeed");
    }

    pub async fn group_discard_stops_group_messages(b: &Backend) {
        let layer = b.layer(Limits::default()).await;
        let mut members = Vec::new();
        for _ in 0..3 {
            let ch = channel(&layer, "member").await;
            layer
                .group_add("room", &ch)
                .await
                .expect("group_add failed");
            members.push(ch);
        }
        layer
            .group_discard("room", &members[0])
            .await
            .expect("group_discard failed");
        let stranger = channel(&layer, "stranger").await;
        layer
            .group_discard("room", &stranger)
            .await
            .expect("discarding a channel that is not a member must succeed");
        layer
            .group_discard("no-such-group", &stranger)
            .await
            .expect("discarding from a group that does not exist must succeed");
        layer
            .group_send("room", message(1))
            .await
            .expect("group_send failed");
        assert_nothing_queued(
            &layer,
            &members[0],
            "a discarded channel still got a group message",
        )
        .await;
        for ch in &members[1..] {
            assert_next(
                &layer,
                ch,
                &message(1),
                "the remaining members still get group messages",
            )
            .await;
        }
        assert_nothing_queued(&layer, &stranger, "a stranger got a group message").await;
    }

    pub async fn group_add_twice_is_one_membership(b: &Backend) {
        let layer = b.layer(Limits::default()).await;
        let ch = channel(&layer, "twice").await;
        layer
            .group_add("room", &ch)
            .await
            .expect("group_add failed");
        layer
            .group_add("room", &ch)
            .await
            .expect("a second group_add failed");
        layer
            .group_send("room", message(1))
            .await
            .expect("group_send failed");
        assert_next(
            &layer,
            &ch,
            &message(1),
            "the member gets the group message",
        )
        .await;
        assert_nothing_queued(
            &layer,
            &ch,
            "a channel added twice got the group message twice",
        )
        .await;
        layer
            .group_discard("room", &ch)
            .await
            .expect("group_discard failed");
        layer
            .group_send("room", message(2))
            .await
            .expect("group_send failed");
        assert_nothing_queued(&layer, &ch, "one discard must undo two adds").await;
    }

    pub async fn a_full_channel_refuses_messages(b: &Backend) {
        let layer = b
            .layer(Limits {
                capacity: 3,
                ..Limits::default()
            })
            .await;
        if !b.caps.capacity {
            note(
                b,
                "no capacity on the wire: send never fails with ChannelFull, and each \
                 channel's local buffer keeps its newest `capacity` messages",
            );
            let ch = channel(&layer, "full").await;
            for n in 1..=5 {
                layer
                    .send(&ch, message(n))
                    .await
                    .unwrap_or_else(|err| panic!("send #{n} into capacity 3: {err}"));
            }
            if !b.caps.delivered_on_return {
                // Let the last sends reach the buffer, which is what keeps
                // the newest 3; a receive before then takes an older one.
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            for n in 3..=5 {
                assert_next(&layer, &ch, &message(n), "the buffer keeps the newest 3").await;
            }
            assert_nothing_queued(&layer, &ch, "the 2 oldest were dropped").await;
            return;
        }
        let full = channel(&layer, "full").await;
        for n in 1..=3 {
            layer
                .send(&full, message(n))
                .await
                .unwrap_or_else(|err| panic!("send #{n} of 3 into capacity 3 failed: {err}"));
        }
        let refused = layer.send(&full, message(4)).await;
        assert!(
            matches!(&refused, Err(LayerError::ChannelFull { channel }) if *channel == full),
            "the 4th send into a channel of capacity 3 must fail with ChannelFull, got {refused:?}"
        );
        assert_next(
            &layer,
            &full,
            &message(1),
            "a full channel keeps its messages",
        )
        .await;
        // After one receive, a full channel takes messages again, until it
        // is full again: one more on a layer that pops what is asked for;
        // more on the queue layers, whose receive may have taken a batch of
        // the process's key into local buffers (32 at most), where it no
        // longer counts against the capacity in Redis.
        let mut last = 3;
        loop {
            match layer.send(&full, message(last + 1)).await {
                Ok(()) => last += 1,
                Err(LayerError::ChannelFull { .. }) => break,
                Err(err) => panic!("send #{} after one receive: {err}", last + 1),
            }
            assert!(
                last < 3 + 40,
                "a channel of capacity 3 took {last} messages"
            );
        }
        assert!(
            last > 3,
            "after one receive, a full channel must take a message again"
        );

        // `full` is full again: a group send skips it, not the others.
        let free = channel(&layer, "free").await;
        layer
            .group_add("room", &full)
            .await
            .expect("group_add failed");
        layer
            .group_add("room", &free)
            .await
            .expect("group_add failed");
        layer.group_send("room", message(10)).await.expect(
            "group_send must succeed when one member is full (that member misses the message)",
        );
        assert_next(
            &layer,
            &free,
            &message(10),
            "the free member must get a group message even though another member is full",
        )
        .await;
        for n in 2..=last {
            assert_next(
                &layer,
                &full,
                &message(n),
                "the full member keeps what it held",
            )
            .await;
        }
        assert_nothing_queued(
            &layer,
            &full,
            "a full member must miss the group message, not get it late",
        )
        .await;
    }

    pub async fn messages_expire(b: &Backend) {
        let layer = b
            .layer(Limits {
                capacity: 3,
                expiry: Duration::from_secs(10),
                ..Limits::default()
            })
            .await;
        let ch = channel(&layer, "expiry").await;

        layer.send(&ch, message(1)).await.expect("send failed");
        tokio::time::advance(Duration::from_secs(11)).await;
        assert_nothing_queued(&layer, &ch, "a message 11 s old with an expiry of 10 s").await;

        // Sent at t=0 and t=9 s, received at t=10.5 s: only the second is left.
        layer.send(&ch, message(2)).await.expect("send failed");
        tokio::time::advance(Duration::from_secs(9)).await;
        layer.send(&ch, message(3)).await.expect("send failed");
        tokio::time::advance(Duration::from_millis(1500)).await;
        assert_next(
            &layer,
            &ch,
            &message(3),
            "at t=10.5 s, the message sent at t=0 has expired and the one sent at t=9 s has not",
        )
        .await;
        assert_nothing_queued(&layer, &ch, "both messages are accounted for").await;

        // Expired messages do not count against the capacity.
        for n in 0..3 {
            layer.send(&ch, message(n)).await.expect("send failed");
        }
        tokio::time::advance(Duration::from_secs(11)).await;
        layer
            .send(&ch, message(4))
            .await
            .expect("a channel full of expired messages must take a new message");
        assert_next(&layer, &ch, &message(4), "expired messages are gone").await;
    }

    pub async fn group_membership_expires_unless_renewed(b: &Backend) {
        let layer = b
            .layer(Limits {
                group_expiry: Duration::from_secs(30),
                ..Limits::default()
            })
            .await;
        let lapsed = channel(&layer, "lapsed").await;
        let renewed = channel(&layer, "renewed").await;
        layer
            .group_add("room", &lapsed)
            .await
            .expect("group_add failed");
        layer
            .group_add("room", &renewed)
            .await
            .expect("group_add failed");
        tokio::time::advance(Duration::from_secs(20)).await;
        layer
            .group_add("room", &renewed)
            .await
            .expect("renewing group_add failed");
        tokio::time::advance(Duration::from_secs(11)).await; // t = 31 s
        layer
            .group_send("room", message(1))
            .await
            .expect("group_send failed");
        assert_nothing_queued(
            &layer,
            &lapsed,
            "a membership 31 s old with a group expiry of 30 s must have lapsed",
        )
        .await;
        assert_next(
            &layer,
            &renewed,
            &message(1),
            "a membership renewed at t=20 s must last until t=50 s",
        )
        .await;

        layer
            .group_add("room", &lapsed)
            .await
            .expect("group_add failed");
        layer
            .group_send("room", message(2))
            .await
            .expect("group_send failed");
        assert_next(
            &layer,
            &lapsed,
            &message(2),
            "adding a lapsed channel again makes it a member again",
        )
        .await;
    }

    pub async fn flush_drops_messages_and_groups(b: &Backend) {
        let layer = b.layer(Limits::default()).await;
        let ch = channel(&layer, "flushed").await;
        layer.send(&ch, message(1)).await.expect("send failed");
        layer
            .group_add("room", &ch)
            .await
            .expect("group_add failed");
        let waiting_on = channel(&layer, "waiting").await;
        let receiver = spawn_receive(&layer, &waiting_on);
        let_others_run().await;

        layer.flush().await.expect("flush failed");
        assert_nothing_queued(&layer, &ch, "flush must drop queued messages").await;
        layer
            .group_send("room", message(2))
            .await
            .expect("group_send failed");
        assert_nothing_queued(&layer, &ch, "flush must drop group memberships").await;

        layer
            .send(&waiting_on, message(3))
            .await
            .expect("send failed");
        let got = timeout(GUARD, receiver)
            .await
            .expect("a receive waiting across a flush was never woken by a later send")
            .expect("the receiving task panicked")
            .expect("receive failed");
        assert_eq!(
            got,
            message(3),
            "the receive waiting across a flush got the wrong message"
        );
    }

    pub async fn invalid_names_are_refused(b: &Backend) {
        let layer = b.layer(Limits::default()).await;
        let good_channel = channel(&layer, "good").await;
        let too_long = "a".repeat(100);
        let bad_channels = ["with space", "café", too_long.as_str(), "", "two!bangs!"];
        let too_long_group = "g".repeat(100);
        let bad_groups = ["a!b", "with space", "café", too_long_group.as_str(), ""];

        let expect_invalid = |result: Result<(), LayerError>,
                              kind: NameKind,
                              name: &str,
                              call: &str| {
            let Err(err) = result else {
                panic!("{call} with the invalid {kind:?} name {name:?} succeeded");
            };
            assert!(
                matches!(&err, LayerError::InvalidName { kind: k, name: n } if *k == kind && n == name),
                "{call} with the invalid {kind:?} name {name:?}: {err:?}"
            );
            let shown = err.to_string();
            assert!(
                shown.contains("ASCII letters") && shown.contains(&format!("{name:?}")),
                "the error for {name:?} should quote it and state the rule, got: {shown}"
            );
        };

        for bad in bad_channels {
            expect_invalid(
                layer.send(bad, message(1)).await,
                NameKind::Channel,
                bad,
                "send",
            );
            let received = timeout(GUARD, layer.receive(bad))
                .await
                .unwrap_or_else(|_| panic!("receive({bad:?}) waited instead of refusing the name"));
            expect_invalid(received.map(drop), NameKind::Channel, bad, "receive");
            expect_invalid(
                layer.group_add("room", bad).await,
                NameKind::Channel,
                bad,
                "group_add",
            );
            expect_invalid(
                layer.group_discard("room", bad).await,
                NameKind::Channel,
                bad,
                "group_discard",
            );
        }
        for bad in bad_groups {
            expect_invalid(
                layer.group_add(bad, &good_channel).await,
                NameKind::Group,
                bad,
                "group_add",
            );
            expect_invalid(
                layer.group_discard(bad, &good_channel).await,
                NameKind::Group,
                bad,
                "group_discard",
            );
            expect_invalid(
                layer.group_send(bad, message(1)).await,
                NameKind::Group,
                bad,
                "group_send",
            );
        }
        for bad_prefix in ["with space", "café", "a!b"] {
            let result = layer.new_channel(bad_prefix).await;
            assert!(
                matches!(
                    result,
                    Err(LayerError::InvalidName {
                        kind: NameKind::Channel,
                        ..
                    })
                ),
                "new_channel({bad_prefix:?}) must refuse a prefix that makes an invalid name, got {result:?}"
            );
        }

        // The longest valid names work.
        let longest = "c".repeat(99);
        listen_first(b, &layer, &longest).await;
        layer
            .send(&longest, message(1))
            .await
            .expect("a 99-character channel name is valid");
        assert_next(&layer, &longest, &message(1), "99-character channel name").await;
        let longest_group = "g".repeat(99);
        layer
            .group_add(&longest_group, &good_channel)
            .await
            .expect("a 99-character group name is valid");
        layer
            .group_send(&longest_group, message(2))
            .await
            .expect("group_send failed");
        assert_next(
            &layer,
            &good_channel,
            &message(2),
            "99-character group name",
        )
        .await;
        assert_nothing_queued(&layer, &good_channel, "refused calls must have no effect").await;
    }

    /// A channel name holding `__group__` is refused everywhere: on the
    /// pub/sub layer `{prefix}__group__{group}` is a group's Redis channel,
    /// so `send("asgi__group__room")` would reach every member of `room`.
    /// The other layers refuse it too, so a name never works in memory and
    /// fails on Redis.
    pub async fn channel_names_that_look_like_group_channels_are_refused(b: &Backend) {
        let layer = b.layer(Limits::default()).await;
        let member = channel(&layer, "member").await;
        layer
            .group_add("room", &member)
            .await
            .expect("group_add failed");
        let expect_refused = |result: Result<(), LayerError>, name: &str, call: &str| {
            let Err(err) = result else {
                panic!("{call}({name:?}) succeeded");
            };
            assert!(
                matches!(&err, LayerError::InvalidName { kind: NameKind::Channel, name: n } if n == name),
                "{call}({name:?}): {err:?}"
            );
            let shown = err.to_string();
            assert!(
                shown.contains("may not hold \"__group__\"") && shown.contains(name),
                "the error for {name:?} should quote it and state the rule, got: {shown}"
            );
        };
        for name in ["asgi__group__room", "chat__group__room", "__group__room"] {
            expect_refused(layer.send(name, message(1)).await, name, "send");
            let received = timeout(GUARD, layer.receive(name))
                .await
                .unwrap_or_else(|_| panic!("receive({name:?}) waited instead of refusing"));
            expect_refused(received.map(drop), name, "receive");
            expect_refused(layer.group_add("room", name).await, name, "group_add");
            expect_refused(
                layer.group_discard("room", name).await,
                name,
                "group_discard",
            );
            expect_refused(layer.close_channel(name).await, name, "close_channel");
        }
        let made = layer.new_channel("a__group__b").await;
        assert!(
            matches!(made, Err(LayerError::InvalidName { .. })),
            "new_channel(\"a__group__b\") must refuse the name it would make, got {made:?}"
        );
        assert_nothing_queued(&layer, &member, "refused sends must reach no group").await;
    }

    /// `messages_expire` on a real clock, for a backend whose server
    /// expires entries itself, in whole seconds (expiry 1 s). The waits give
    /// lower bounds that no scheduling delay can break; the upper bounds
    /// have a margin of 0.5 s.
    pub async fn messages_expire_in_real_time(b: &Backend) {
        let layer = b
            .layer(Limits {
                capacity: 3,
                expiry: Duration::from_secs(1),
                ..Limits::default()
            })
            .await;
        let ch = channel(&layer, "expiry").await;

        layer.send(&ch, message(1)).await.expect("send failed");
        tokio::time::sleep(Duration::from_millis(1100)).await;
        assert_nothing_queued(&layer, &ch, "a message 1.1 s old with an expiry of 1 s").await;

        // Sent at t=0 and t=0.7 s, received at t=1.2 s: the second send kept
        // the first alive in the server, so the receiver must drop it.
        layer.send(&ch, message(2)).await.expect("send failed");
        tokio::time::sleep(Duration::from_millis(700)).await;
        layer.send(&ch, message(3)).await.expect("send failed");
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_next(
            &layer,
            &ch,
            &message(3),
            "at t=1.2 s, the message sent at t=0 has expired and the one sent at t=0.7 s has not",
        )
        .await;
        assert_nothing_queued(&layer, &ch, "both messages are accounted for").await;

        // Expired messages do not count against the capacity.
        for n in 0..3 {
            layer.send(&ch, message(n)).await.expect("send failed");
        }
        tokio::time::sleep(Duration::from_millis(1100)).await;
        layer
            .send(&ch, message(4))
            .await
            .expect("a channel full of expired messages must take a new message");
        assert_next(&layer, &ch, &message(4), "expired messages are gone").await;
    }

    /// `group_membership_expires_unless_renewed` on a real clock (group
    /// expiry 2 s). With whole seconds, a membership lasts between 2 and
    /// 3 s: the lapsed one is 3.3 s old, the renewed one 0.9 s.
    pub async fn group_membership_expires_in_real_time(b: &Backend) {
        let layer = b
            .layer(Limits {
                group_expiry: Duration::from_secs(2),
                ..Limits::default()
            })
            .await;
        let lapsed = channel(&layer, "lapsed").await;
        let renewed = channel(&layer, "renewed").await;
        for ch in [&lapsed, &renewed] {
            layer.group_add("room", ch).await.expect("group_add failed");
        }
        for wait in [1200, 1200, 900] {
            tokio::time::sleep(Duration::from_millis(wait)).await;
            if wait > 1000 {
                layer
                    .group_add("room", &renewed)
                    .await
                    .expect("renewing group_add failed");
            }
        }
        layer
            .group_send("room", message(1))
            .await
            .expect("group_send failed");
        assert_nothing_queued(
            &layer,
            &lapsed,
            "a membership 3.3 s old with a group expiry of 2 s must have lapsed",
        )
        .await;
        assert_next(
            &layer,
            &renewed,
            &message(1),
            "a membership renewed 0.9 s ago must still hold",
        )
        .await;
        layer
            .group_add("room", &lapsed)
            .await
            .expect("group_add failed");
        layer
            .group_send("room", message(2))
            .await
            .expect("group_send failed");
        assert_next(
            &layer,
            &lapsed,
            &message(2),
            "adding a lapsed channel again makes it a member again",
        )
        .await;
    }

    /// For a backend where nothing expires: says so, and checks the layer
    /// tells the runner there is nothing to renew.
    pub async fn nothing_expires_by_design(b: &Backend) {
        let layer = b.layer(Limits::default()).await;
        assert_eq!(b.caps.expiry, Expiry::Never);
        assert_eq!(b.caps.group_expiry, Expiry::Never);
        note(
            b,
            "messages do not expire (they are delivered at once or never), and group \
             memberships are local and never lapse",
        );
        assert_eq!(
            layer.group_expiry(),
            None,
            "a backend whose memberships never lapse must not ask the runner to renew them"
        );
    }

    /// Prints the backend's table of capabilities, and checks what the
    /// layer itself reports agrees with it.
    pub async fn documented_differences(b: &Backend) {
        let layer = b.layer(Limits::default()).await;
        let caps = b.caps;
        assert_eq!(
            layer.group_expiry().is_some(),
            caps.group_expiry != Expiry::Never,
            "group_expiry() must be Some exactly when memberships lapse"
        );
        if !caps.keeps_unreceived {
            note(
                b,
                "a message sent to a channel nobody receives on yet is lost (checks listen first)",
            );
            let ch = channel(&layer, "fresh").await;
            layer
                .send("nobody-listens", message(1))
                .await
                .expect("send failed");
            assert_nothing_queued(&layer, &ch, "a channel made after the send").await;
        }
        if !caps.name_prefix.is_empty() {
            note(
                b,
                &format!(
                    "new_channel(prefix) names start with the layer's prefix {:?}, as in Python",
                    caps.name_prefix
                ),
            );
        }
        let line = format!("conformance: {}: {caps:?}\n", b.name);
        let _ = std::io::stderr().write_all(line.as_bytes());
    }

    pub async fn many_concurrent_senders_and_receivers(b: &Backend) {
        const CHANNELS: usize = 8;
        const SENDERS: u64 = 4;
        const PER_SENDER: u64 = 50;
        let layer = b
            .layer(Limits {
                capacity: 1000,
                ..Limits::default()
            })
            .await;
        let mut channels = Vec::new();
        for _ in 0..CHANNELS {
            channels.push(channel(&layer, "load").await);
        }

        let receivers: Vec<_> = channels
            .iter()
            .map(|ch| {
                let layer = Arc::clone(&layer);
                let ch = ch.clone();
                tokio::spawn(async move {
                    let mut last_seq = vec![None::<u64>; SENDERS as usize];
                    for i in 0..SENDERS * PER_SENDER {
                        let got = layer
                            .receive(&ch)
                            .await
                            .unwrap_or_else(|err| panic!("receive #{i} on {ch:?}: {err}"));
                        let sender = got["sender"].as_u64().expect("sender") as usize;
                        let seq = got["seq"].as_u64().expect("seq");
                        if let Some(last) = last_seq[sender] {
                            assert!(
                                seq > last,
                                "{ch:?}: from sender {sender}, seq {seq} came after seq {last}"
                            );
                        }
                        last_seq[sender] = Some(seq);
                    }
                    last_seq
                })
            })
            .collect();
        let senders: Vec<_> = (0..SENDERS)
            .map(|sender| {
                let layer = Arc::clone(&layer);
                let channels = channels.clone();
                tokio::spawn(async move {
                    for seq in 0..PER_SENDER {
                        for ch in &channels {
                            let payload =
                                json!({"type": "test.load", "sender": sender, "seq": seq});
                            layer
                                .send(ch, payload.as_object().unwrap().clone())
                                .await
                                .unwrap_or_else(|err| {
                                    panic!("sender {sender}, seq {seq}, to {ch:?}: {err}")
                                });
                        }
                    }
                })
            })
            .collect();

        let all = async {
            for sender in senders {
                sender.await.expect("a sender task panicked");
            }
            let mut results = Vec::new();
            for receiver in receivers {
                results.push(receiver.await.expect("a receiver task panicked"));
            }
            results
        };
        let results = timeout(Duration::from_secs(10), all).await.expect(
            "8 receivers x 200 messages did not all arrive within 10 s: messages were lost \
             or a receiver was never woken",
        );
        for (ch, last_seq) in channels.iter().zip(results) {
            assert_eq!(
                last_seq,
                vec![Some(PER_SENDER - 1); SENDERS as usize],
                "{ch:?} must have received every sender's last message"
            );
        }
        for ch in &channels {
            assert_nothing_queued(&layer, ch, "exactly 200 messages per channel").await;
        }
    }
}

/// Runs every check in [`checks`] against one backend, as
/// `mod $backend { #[tokio::test] async fn $check() ... }`.
///
/// `$make` is an expression giving `Option<Backend>` (`None`: skipped, and
/// the backend has said so loudly); `expiry` picks the expiry checks:
/// `paused` (tokio's paused clock), `real_time` (short real waits) or
/// `none` (a check that states the backend has no expiry).
macro_rules! conformance_tests {
    ($backend:ident, $make:expr, expiry = $expiry:ident) => {
        mod $backend {
            use super::*;

            // Async: a Redis backend waits for its redis-server to start.
            async fn backend() -> Option<Backend> {
                $make
            }

            conformance_tests!(@each [tokio::test]
                new_channel_names_are_unique_valid_and_prefixed,
                send_then_receive_returns_the_same_message,
                messages_of_a_channel_arrive_in_order,
                receive_waits_until_a_message_arrives,
                a_cancelled_receive_loses_nothing,
                channels_are_isolated,
                group_send_reaches_every_member,
                group_discard_stops_group_messages,
                group_add_twice_is_one_membership,
                a_full_channel_refuses_messages,
                flush_drops_messages_and_groups,
                invalid_names_are_refused,
                channel_names_that_look_like_group_channels_are_refused,
                documented_differences,
            );
            conformance_tests!(@expiry $expiry);
            conformance_tests!(@each [tokio::test(flavor = "multi_thread", worker_threads = 2)]
                many_concurrent_senders_and_receivers,
            );
        }
    };
    (@expiry paused) => {
        conformance_tests!(@each [tokio::test(start_paused = true)]
            messages_expire,
            group_membership_expires_unless_renewed,
        );
    };
    (@expiry real_time) => {
        conformance_tests!(@each [tokio::test]
            messages_expire_in_real_time,
            group_membership_expires_in_real_time,
        );
    };
    (@expiry none) => {
        conformance_tests!(@each [tokio::test] nothing_expires_by_design);
    };
    (@each [$attr:meta] $($check:ident),+ $(,)?) => {
        $(
            #[$attr]
            async fn $check() {
                let Some(backend) = backend().await else {
                    return;
                };
                checks::$check(&backend).await;
            }
        )+
    };
}

conformance_tests!(memory, Some(Backend::memory()), expiry = paused);

#[cfg(feature = "redis")]
conformance_tests!(
    redis_queue,
    Backend::redis_queue().await,
    expiry = real_time
);

#[cfg(feature = "redis")]
conformance_tests!(redis_pubsub, Backend::redis_pubsub().await, expiry = none);

// The same checks on a six-node Redis Cluster of their own per test.
#[cfg(feature = "redis")]
conformance_tests!(
    redis_queue_cluster,
    Backend::redis_queue_cluster().await,
    expiry = real_time
);

#[cfg(feature = "redis")]
conformance_tests!(
    redis_pubsub_cluster,
    Backend::redis_pubsub_cluster().await,
    expiry = none
);

/// The Redis backends: each test on a redis-server of its own.
#[cfg(feature = "redis")]
mod redis_backends {
    use axum_channels::layer::redis::{
        RedisClusterLayer, RedisConfig, RedisLayer, RedisPubSubLayer,
    };
    use channels_testkit::{RedisCluster, RedisServer};

    use super::*;

    fn config(url: &str, limits: Limits) -> RedisConfig {
        RedisConfig::new(url)
            .with_capacity(limits.capacity)
            .with_expiry(limits.expiry)
            .with_group_expiry(limits.group_expiry)
            // A closed channel's popper stops within a second.
            .with_block_timeout(Duration::from_secs(1))
    }

    impl Backend {
        pub(crate) async fn redis_queue() -> Option<Backend> {
            let server = RedisServer::start().await?;
            let url = server.url();
            Some(Backend {
                name: "redis_queue",
                caps: Capabilities {
                    name_prefix: "",
                    capacity: true,
                    keeps_unreceived: true,
                    expiry: Expiry::WallClock,
                    group_expiry: Expiry::WallClock,
                    delivered_on_return: true,
                },
                build: Box::new(move |limits| {
                    let url = url.clone();
                    Box::pin(async move {
                        let layer = RedisLayer::connect(config(&url, limits)).await;
                        Arc::new(layer.expect("connect to the test's redis-server")) as Layer
                    })
                }),
                _server: Some(Box::new(server)),
            })
        }

        pub(crate) async fn redis_pubsub() -> Option<Backend> {
            let server = RedisServer::start().await?;
            let url = server.url();
            Some(Backend {
                name: "redis_pubsub",
                caps: Capabilities {
                    name_prefix: "asgi",
                    capacity: false,
                    keeps_unreceived: false,
                    expiry: Expiry::Never,
                    group_expiry: Expiry::Never,
                    delivered_on_return: true,
                },
                build: Box::new(move |limits| {
                    let url = url.clone();
                    Box::pin(async move {
                        let layer = RedisPubSubLayer::connect(config(&url, limits)).await;
                        Arc::new(layer.expect("connect to the test's redis-server")) as Layer
                    })
                }),
                _server: Some(Box::new(server)),
            })
        }

        pub(crate) async fn redis_queue_cluster() -> Option<Backend> {
            let cluster = RedisCluster::start().await?;
            let urls = cluster.urls();
            Some(Backend {
                name: "redis_queue_cluster",
                caps: Capabilities {
                    name_prefix: "",
                    capacity: true,
                    keeps_unreceived: true,
                    expiry: Expiry::WallClock,
                    group_expiry: Expiry::WallClock,
                    delivered_on_return: true,
                },
                build: Box::new(move |limits| {
                    let config = config(&urls[0], limits).with_hosts(urls.clone());
                    Box::pin(async move {
                        let layer = RedisClusterLayer::connect(config).await;
                        Arc::new(layer.expect("connect to the test's Redis Cluster")) as Layer
                    })
                }),
                _server: Some(Box::new(cluster)),
            })
        }

        pub(crate) async fn redis_pubsub_cluster() -> Option<Backend> {
            let cluster = RedisCluster::start().await?;
            let urls = cluster.urls();
            Some(Backend {
                name: "redis_pubsub_cluster",
                caps: Capabilities {
                    name_prefix: "asgi",
                    capacity: false,
                    keeps_unreceived: false,
                    expiry: Expiry::Never,
                    group_expiry: Expiry::Never,
                    delivered_on_return: false,
                },
                build: Box::new(move |limits| {
                    let config = config(&urls[0], limits).with_hosts(urls.clone());
                    Box::pin(async move {
                        let layer = RedisPubSubLayer::connect_cluster(config).await;
                        Arc::new(layer.expect("connect to the test's Redis Cluster")) as Layer
                    })
                }),
                _server: Some(Box::new(cluster)),
            })
        }
    }
}

/// Checks of the in-memory backend alone.
mod memory_only {
    use super::*;

    fn layer(config: MemoryConfig) -> (Arc<InMemoryLayer>, Layer) {
        let concrete = Arc::new(InMemoryLayer::new(config));
        let shared: Layer = concrete.clone();
        (concrete, shared)
    }

    #[tokio::test]
    async fn close_channel_frees_idle_channels() {
        let (memory, layer) = layer(MemoryConfig::default());
        assert_eq!(memory.size(), (0, 0), "a new layer holds nothing");
        let mut channels = Vec::new();
        for n in 0..3 {
            let ch = channel(&layer, "closing").await;
            layer.send(&ch, message(n)).await.expect("send failed");
            layer
                .group_add("room", &ch)
                .await
                .expect("group_add failed");
            layer
                .group_add("other", &ch)
                .await
                .expect("group_add failed");
            channels.push(ch);
        }
        assert_eq!(memory.size(), (3, 2), "3 channels with a message, 2 groups");
        layer
            .group_send("room", message(9))
            .await
            .expect("group_send failed");
        for (n, ch) in (0..).zip(&channels) {
            assert_next(&layer, ch, &message(n), "direct message").await;
            assert_next(&layer, ch, &message(9), "group message").await;
            layer
                .group_discard("room", ch)
                .await
                .expect("group_discard failed");
            layer
                .group_discard("other", ch)
                .await
                .expect("group_discard failed");
        }
        assert_eq!(memory.size().1, 0, "groups without members must be gone");
        for ch in &channels {
            layer.close_channel(ch).await.expect("close_channel failed");
        }
        assert_eq!(
            memory.size(),
            (0, 0),
            "after closing every channel and discarding every membership, the layer must hold nothing"
        );
    }

    #[tokio::test]
    async fn close_channel_also_leaves_its_groups() {
        let (memory, layer) = layer(MemoryConfig::default());
        let gone = channel(&layer, "gone").await;
        let stays = channel(&layer, "stays").await;
        for ch in [&gone, &stays] {
            layer.group_add("room", ch).await.expect("group_add failed");
        }
        layer
            .close_channel(&gone)
            .await
            .expect("close_channel failed");
        layer
            .group_send("room", message(1))
            .await
            .expect("group_send failed");
        assert_next(&layer, &stays, &message(1), "the remaining member").await;
        assert_eq!(
            memory.size(),
            (1, 1),
            "a group message must not bring the closed channel back"
        );
        assert!(matches!(
            layer.close_channel("with space").await,
            Err(LayerError::InvalidName { .. })
        ));
    }

    #[tokio::test]
    async fn close_channel_keeps_a_channel_someone_waits_on() {
        let (memory, layer) = layer(MemoryConfig::default());
        let ch = channel(&layer, "busy").await;
        let receiver = spawn_receive(&layer, &ch);
        let_others_run().await;
        layer
            .close_channel(&ch)
            .await
            .expect("close_channel failed");
        layer.send(&ch, message(1)).await.expect("send failed");
        let got = timeout(GUARD, receiver)
            .await
            .expect("closing a channel stranded the receive waiting on it")
            .expect("the receiving task panicked")
            .expect("receive failed");
        assert_eq!(got, message(1));
        layer
            .close_channel(&ch)
            .await
            .expect("close_channel failed");
        assert_eq!(memory.size(), (0, 0), "the idle channel must be freed");
    }

    #[tokio::test(start_paused = true)]
    async fn expired_messages_and_memberships_are_swept() {
        let (memory, layer) = layer(
            MemoryConfig::default()
                .with_expiry(Duration::from_secs(10))
                .with_group_expiry(Duration::from_secs(30)),
        );
        let forgotten = channel(&layer, "forgotten").await;
        layer
            .send(&forgotten, message(1))
            .await
            .expect("send failed");
        layer
            .group_add("room", &forgotten)
            .await
            .expect("group_add failed");
        assert_eq!(memory.size(), (1, 1));
        tokio::time::advance(Duration::from_secs(31)).await;
        let other = channel(&layer, "other").await;
        layer.send(&other, message(2)).await.expect("send failed");
        assert_eq!(
            memory.size(),
            (1, 0),
            "a send after the expiries must sweep the expired channel and the lapsed group, \
             leaving only the channel just sent to"
        );
    }

    #[tokio::test]
    async fn channel_capacity_patterns_apply() {
        let (_, layer) = layer(
            MemoryConfig::default()
                .with_capacity(5)
                .with_channel_capacity("jobs*", 3)
                .with_channel_capacity("exact", 1),
        );
        let cases = [
            ("jobs.a!1", 3),
            ("jobs", 3),
            ("exact", 1),
            ("exactly", 5),
            ("other", 5),
        ];
        for (ch, capacity) in cases {
            for n in 0..capacity {
                layer
                    .send(ch, message(n))
                    .await
                    .unwrap_or_else(|err| panic!("{ch:?}: send #{n} of {capacity}: {err}"));
            }
            let refused = layer.send(ch, message(99)).await;
            assert!(
                matches!(&refused, Err(LayerError::ChannelFull { channel }) if channel == ch),
                "{ch:?} should hold exactly {capacity} messages, got {refused:?}"
            );
        }
    }
}

/// [`Layers`], the registry of layers by alias.
mod registry {
    use super::*;

    fn get(layers: &Layers, alias: &str) -> Layer {
        layers
            .get(alias)
            .unwrap_or_else(|err| panic!("get({alias:?}) must find the registered layer: {err}"))
    }

    #[tokio::test]
    async fn a_registered_alias_gives_its_layer() {
        let layers = Layers::new().with("chat", InMemoryLayer::default());
        let layer = get(&layers, "chat");
        let ch = channel(&layer, "registry").await;
        layer.send(&ch, message(1)).await.expect("send failed");
        let again = get(&layers, "chat");
        assert_next(
            &again,
            &ch,
            &message(1),
            "two gets of one alias must give the same layer",
        )
        .await;
    }

    #[tokio::test]
    async fn shared_layers_are_one_layer() {
        let shared: Layer = Arc::new(InMemoryLayer::default());
        let layers = Layers::new()
            .with_shared("chat", shared.clone())
            .with_shared("events", shared);
        let chat = get(&layers, "chat");
        let events = get(&layers, "events");
        let ch = channel(&chat, "shared").await;
        chat.send(&ch, message(1)).await.expect("send failed");
        assert_next(&events, &ch, &message(1), "both aliases name one layer").await;
    }

    #[test]
    fn an_unknown_alias_is_an_error_listing_the_known_ones() {
        let layers = Layers::new()
            .with("chat", InMemoryLayer::default())
            .with("queue", InMemoryLayer::default());
        let Err(err) = layers.get("nope") else {
            panic!("get(\"nope\") must fail: nothing is registered as \"nope\"");
        };
        assert!(
            matches!(
                &err,
                LayerError::UnknownAlias { alias, known } if alias == "nope" && *known == ["chat", "queue"]
            ),
            "{err:?}"
        );
        let shown = err.to_string();
        assert!(
            shown.contains("\"nope\"") && shown.contains("chat") && shown.contains("queue"),
            "the error should name the alias asked for and the registered ones, got: {shown}"
        );

        let Err(none) = Layers::new().get("chat") else {
            panic!("an empty registry has no \"chat\"");
        };
        assert!(
            none.to_string().contains("none"),
            "with nothing registered the error should say so, got: {none}"
        );
    }
}
