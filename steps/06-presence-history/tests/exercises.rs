//! The solution to chapter 5's exercise, checked: which Redis of a sharded
//! `REDIS_URL` carries a room? The chapter shows it folded, below its hints.
//!
//! Without `redis-server` installed, the test says so and passes; with
//! `CI=true` it fails.

use std::time::Duration;

use axum_channels::layer::group_name_for;
use channels_testkit::RedisServer;
use step_06_presence_history::setup_redis;

// ANCHOR: shard_of
/// Which of `urls` carries the room `room` now: the index of the Redis
/// where a server is subscribed to the room's group, or `None` if no server
/// has a member in it.
async fn shard_of(urls: &[String], room: &str) -> redis::RedisResult<Option<usize>> {
    // The `"chat"` layer's Redis channel for the room's group.
    let channel = format!("chat__group__{}", group_name_for("room", room));
    for (index, url) in urls.iter().enumerate() {
        let client = redis::Client::open(url.as_str())?;
        let mut connection = client.get_multiplexed_async_connection().await?;
        let subscribed: Vec<String> = redis::cmd("PUBSUB")
            .arg("CHANNELS")
            .arg(&channel)
            .query_async(&mut connection)
            .await?;
        if !subscribed.is_empty() {
            return Ok(Some(index));
        }
    }
    Ok(None)
}
// ANCHOR_END: shard_of

#[tokio::test]
async fn each_room_lives_on_one_shard_and_the_rooms_spread() {
    let (Some(first), Some(second)) = (RedisServer::start().await, RedisServer::start().await)
    else {
        return;
    };
    let urls = vec![first.url(), second.url()];
    let layers = setup_redis(&urls.join(","), None, Duration::from_secs(60))
        .await
        .expect("the step's layers");
    let chat = layers.get("chat").expect("the chat layer");
    let rooms = ["lobby", "kitchen", "garden", "attic", "cellar", "hall"];
    for room in rooms {
        // What a member's connection does when it joins the room.
        let channel = chat.new_channel("specific.").await.unwrap();
        chat.group_add(&group_name_for("room", room), &channel)
            .await
            .unwrap();
    }
    let mut shards = Vec::new();
    for room in rooms {
        let shard = shard_of(&urls, room).await.unwrap();
        assert!(shard.is_some(), "{room} is on no shard");
        shards.push(shard);
    }
    assert!(
        shards.contains(&Some(0)) && shards.contains(&Some(1)),
        "six rooms on one shard of two: {shards:?}"
    );
    assert_eq!(shard_of(&urls, "nobody-here").await.unwrap(), None);
}
