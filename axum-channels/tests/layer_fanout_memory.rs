//! What a group message costs in memory: one copy, however many members.
//!
//! A client that sends big messages into a big room must not be able to
//! multiply the server's memory by the room's size. The layers share one
//! copy of a group message between every member's buffer (an `Arc`), so a
//! 1 MiB message to 100 members that never read costs about 1 MiB, not 100.
//!
//! Memory is measured as the bytes the process has allocated and not freed,
//! counted by the [`Counting`] global allocator, not as RSS, which the
//! allocator rounds and keeps. That is why these checks live in a file of
//! their own (one test file is one process) and run one after the other in
//! a single test: any other test running alongside would allocate into the
//! count.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use axum_channels::layer::{ChannelLayer, InMemoryLayer, LayerMessage, MemoryConfig};
use serde_json::json;

/// The system allocator, keeping count of the bytes allocated and not yet
/// freed.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is passed on to `System` unchanged; the counter only
// observes the sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's guarantees are `System`'s.
        let ptr = unsafe { System.alloc(layout) };
        if !ptr.is_null() {
            LIVE.fetch_add(layout.size(), Ordering::Relaxed);
        }
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as above.
        let ptr = unsafe { System.alloc_zeroed(layout) };
        if !ptr.is_null() {
            LIVE.fetch_add(layout.size(), Ordering::Relaxed);
        }
        ptr
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: as above.
        let moved = unsafe { System.realloc(ptr, layout, new_size) };
        if !moved.is_null() {
            LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
            LIVE.fetch_add(new_size, Ordering::Relaxed);
        }
        moved
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn live() -> usize {
    LIVE.load(Ordering::Relaxed)
}

const MIB: usize = 1024 * 1024;
const MEMBERS: usize = 100;

/// The most a 1 MiB group message may add, whatever the number of members:
/// the message itself, plus room for the buffers' own bookkeeping.
const BUDGET: usize = 3 * MIB;

/// A message with a 1 MiB string in it.
fn big_message() -> LayerMessage {
    json!({"type": "room.message", "text": "x".repeat(MIB)})
        .as_object()
        .expect("an object")
        .clone()
}

/// Makes `MEMBERS` channels that join `room` and never read, and returns
/// them with the live bytes once that is done.
async fn room_of_readers_that_never_read(layer: &dyn ChannelLayer) -> Vec<String> {
    let mut members = Vec::with_capacity(MEMBERS);
    for _ in 0..MEMBERS {
        let channel = layer.new_channel("specific").await.expect("new_channel");
        layer.group_add("room", &channel).await.expect("group_add");
        members.push(channel);
    }
    members
}

/// Sends one 1 MiB message to the room, returning how many bytes it added.
/// The message is built before the first count, so that what is counted is
/// what the layer keeps beyond the sender's own copy.
async fn cost_of_one_group_send(layer: &dyn ChannelLayer) -> usize {
    let message = big_message();
    let before = live();
    layer.group_send("room", message).await.expect("group_send");
    live().saturating_sub(before)
}

async fn in_memory() {
    let layer = InMemoryLayer::new(MemoryConfig::default());
    let members = room_of_readers_that_never_read(&layer).await;
    // A first message grows the maps and queues to their size, so that the
    // second one measures the message alone.
    cost_of_one_group_send(&layer).await;
    let added = cost_of_one_group_send(&layer).await;
    eprintln!(
        "layer_fanout_memory: in memory, a 1 MiB message to {MEMBERS} members added {:.2} MiB ({added} bytes)",
        added as f64 / MIB as f64
    );
    assert!(
        added < BUDGET,
        "a 1 MiB message to {MEMBERS} members added {added} bytes ({:.1} MiB): \
         each member holds a copy of its own",
        added as f64 / MIB as f64
    );
    // Each member still gets the whole message.
    for channel in &members {
        let got = layer.receive(channel).await.expect("receive");
        assert_eq!(got["text"].as_str().map(str::len), Some(MIB));
    }
}

/// The pub/sub layer, through a Redis of its own: the message comes back
/// from Redis once and is handed to every local member. Delivery is awaited
/// by receiving it on the first member, which drops that copy again.
async fn pubsub() {
    use axum_channels::layer::redis::{RedisConfig, RedisPubSubLayer};
    use channels_testkit::RedisServer;

    let Some(server) = RedisServer::start().await else {
        return;
    };
    let layer =
        RedisPubSubLayer::connect(RedisConfig::new(server.url()).with_max_message_size(4 * MIB))
            .await
            .expect("connect the pub/sub layer");
    let members = room_of_readers_that_never_read(&layer).await;
    let delivered = async |layer: &RedisPubSubLayer| {
        let got = layer.receive(&members[0]).await.expect("receive");
        assert_eq!(got["text"].as_str().map(str::len), Some(MIB));
    };
    // The first message also grows the connection's read and write
    // buffers, which it keeps: the second one measures the message alone.
    cost_of_one_group_send(&layer).await;
    delivered(&layer).await;
    let message = big_message();
    let before = live();
    layer.group_send("room", message).await.expect("group_send");
    delivered(&layer).await;
    let added = live().saturating_sub(before);
    eprintln!(
        "layer_fanout_memory: on pub/sub, a 1 MiB message to {MEMBERS} members added {:.2} MiB ({added} bytes)",
        added as f64 / MIB as f64
    );
    assert!(
        added < BUDGET,
        "a 1 MiB message to {MEMBERS} members added {added} bytes ({:.1} MiB): \
         each member holds a copy of its own",
        added as f64 / MIB as f64
    );
}

#[tokio::test(flavor = "current_thread")]
async fn a_group_message_is_held_once_whatever_the_number_of_members() {
    in_memory().await;
    pubsub().await;
}
