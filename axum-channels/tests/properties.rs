//! Properties that must hold for every input, not just the examples the
//! other tests pick: checked with `proptest` on thousands of generated
//! strings and frames, and on layer configurations at the edges of what
//! time arithmetic can hold.

use std::time::Duration;

use axum_channels::InvalidMessage;
use axum_channels::layer::redis::{MAX_MESSAGE_SIZE_LIMIT, MAX_TIMEOUT, RedisConfig};
use axum_channels::layer::{
    ChannelLayer, InMemoryLayer, LayerError, MAX_EXPIRY, MemoryConfig, group_name_for,
    validate_group_name,
};
use axum_channels::socket::Frame;
use proptest::prelude::*;

/// Reads an escaped group name back into the text it came from: the inverse
/// of `group_name_for` for names short enough not to be hashed.
fn read_back(prefix: &str, name: &str) -> Option<String> {
    let escaped = name.strip_prefix(prefix)?.strip_prefix('_')?;
    let mut bytes = Vec::new();
    let mut rest = escaped.bytes();
    while let Some(byte) = rest.next() {
        if byte == b'_' {
            let high = char::from(rest.next()?).to_digit(16)?;
            let low = char::from(rest.next()?).to_digit(16)?;
            bytes.push(u8::try_from(high * 16 + low).ok()?);
        } else {
            bytes.push(byte);
        }
    }
    String::from_utf8(bytes).ok()
}

#[derive(Debug, serde::Deserialize)]
#[allow(dead_code)] // only decoded, to exercise serde
struct JobRequest {
    #[serde(rename = "type")]
    kind: Option<String>,
    content: String,
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2_000))]

    /// Any text at all, however long or strange, gives a valid group name.
    #[test]
    fn group_names_are_always_valid(text in any::<String>()) {
        let name = group_name_for("room", &text);
        prop_assert!(validate_group_name(&name).is_ok(), "{name:?} from {text:?}");
    }

    /// Escaped names read back to their text, so two texts never share one.
    #[test]
    fn group_names_are_reversible(text in ".{0,40}") {
        let name = group_name_for("room", &text);
        if !name.starts_with("room-") {
            prop_assert_eq!(read_back("room", &name), Some(text));
        }
    }

    /// Two different texts never get the same group, hashed or not.
    #[test]
    fn different_texts_get_different_groups(a in any::<String>(), b in any::<String>()) {
        prop_assume!(a != b);
        prop_assert_ne!(group_name_for("room", &a), group_name_for("room", &b));
    }

    /// No text frame, JSON or not, makes decoding panic.
    #[test]
    fn decoding_any_text_never_panics(text in any::<String>()) {
        let _ = InvalidMessage::decode::<JobRequest>(&Frame::Text(text));
    }

    /// Nor does JSON-looking text, nested deeply or not.
    #[test]
    fn decoding_json_like_text_never_panics(text in r#"[\[\]{}":,0-9a-z \\]{0,200}"#) {
        let _ = InvalidMessage::decode::<JobRequest>(&Frame::Text(text));
    }

    /// Nor does any binary frame.
    #[test]
    fn decoding_any_binary_frame_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let decoded = InvalidMessage::decode::<JobRequest>(&Frame::Binary(bytes.into()));
        prop_assert!(
            matches!(decoded, Err(InvalidMessage::Binary { .. })),
            "a binary frame is reported as binary"
        );
    }
}

/// Any duration, with the edges weighted up: zero, a nanosecond, the
/// limits, and the values where seconds stop fitting an `i64` or a `u64`.
fn any_duration() -> impl Strategy<Value = Duration> {
    prop_oneof![
        prop::sample::select(vec![
            Duration::ZERO,
            Duration::from_nanos(1),
            Duration::from_millis(1),
            Duration::from_secs(1),
            MAX_EXPIRY,
            MAX_EXPIRY + Duration::from_nanos(1),
            MAX_TIMEOUT,
            Duration::from_secs(i64::MAX as u64),
            Duration::from_secs(i64::MAX as u64 + 1),
            Duration::from_secs(u64::MAX),
            Duration::MAX,
        ]),
        (0u64..100_000).prop_map(Duration::from_millis),
        (any::<u64>(), 0u32..1_000_000_000).prop_map(|(secs, nanos)| Duration::new(secs, nanos)),
    ]
}

/// Any size, with zero, one and the largest weighted up.
fn any_size() -> impl Strategy<Value = usize> {
    prop_oneof![
        prop::sample::select(vec![0, 1, 2, usize::MAX]),
        0usize..1000,
        any::<usize>(),
    ]
}

fn memory_config() -> impl Strategy<Value = MemoryConfig> {
    (any_size(), any_size(), any_duration(), any_duration()).prop_map(
        |(capacity, jobs_capacity, expiry, group_expiry)| {
            MemoryConfig::default()
                .with_capacity(capacity)
                .with_channel_capacity("jobs*", jobs_capacity)
                .with_expiry(expiry)
                .with_group_expiry(group_expiry)
        },
    )
}

fn redis_config() -> impl Strategy<Value = RedisConfig> {
    (
        (any_size(), any_size(), any_size()),
        (
            any_duration(),
            any_duration(),
            any_duration(),
            any_duration(),
        ),
    )
        .prop_map(
            |(
                (capacity, jobs_capacity, max_message_size),
                (expiry, group_expiry, block, command),
            )| {
                RedisConfig::new("redis://127.0.0.1:1")
                    .with_capacity(capacity)
                    .with_channel_capacity("jobs*", jobs_capacity)
                    .with_max_message_size(max_message_size)
                    .with_expiry(expiry)
                    .with_group_expiry(group_expiry)
                    .with_block_timeout(block)
                    .with_command_timeout(command)
            },
        )
}

/// Every call of a layer, on a paused clock (so a 1 ms expiry does not lapse
/// between a send and its receive). Panics if anything does.
fn exercise(layer: InMemoryLayer) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap();
    runtime.block_on(async {
        let message = serde_json::json!({"type": "t"})
            .as_object()
            .unwrap()
            .clone();
        for prefix in ["specific", "jobs"] {
            let channel = layer.new_channel(prefix).await.unwrap();
            layer.send(&channel, message.clone()).await.unwrap();
            assert_eq!(layer.receive(&channel).await.unwrap(), message);
            layer.group_add("room", &channel).await.unwrap();
            layer.group_send("room", message.clone()).await.unwrap();
            assert_eq!(layer.receive(&channel).await.unwrap(), message);
            // Past a sweep, and past the shortest expiry.
            tokio::time::advance(Duration::from_secs(2)).await;
            layer.group_send("room", message.clone()).await.unwrap();
            // Full if the group message is still there (capacity 1, a long
            // expiry): refused, as it should be.
            let sent = layer.send(&channel, message.clone()).await;
            assert!(
                matches!(sent, Ok(()) | Err(LayerError::ChannelFull { .. })),
                "{sent:?}"
            );
            layer.group_discard("room", &channel).await.unwrap();
            layer.close_channel(&channel).await.unwrap();
        }
        layer.flush().await.unwrap();
        let renewal = layer.group_expiry().unwrap();
        assert!(renewal > Duration::ZERO && renewal <= MAX_EXPIRY);
    });
}

/// Checks that a refusal names the setting, and that the setting is one of
/// those out of range.
fn assert_names_a_bad_field(err: &LayerError, out_of_range: &[&str]) {
    let LayerError::InvalidConfig { field, .. } = err else {
        panic!("not an InvalidConfig: {err:?}");
    };
    assert!(!err.is_outage(), "{err}");
    assert!(out_of_range.contains(field), "{field} is in range: {err}");
    assert!(err.to_string().contains(field), "{err}");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(500))]

    /// No configuration of the in-memory layer makes building it, or any
    /// call, panic: `new` moves every limit into its range.
    #[test]
    fn no_memory_config_panics(config in memory_config()) {
        exercise(InMemoryLayer::new(config));
    }

    /// `try_new` refuses exactly the configurations outside the ranges, and
    /// says which setting is out.
    #[test]
    fn try_new_refuses_exactly_what_is_out_of_range(config in memory_config()) {
        let lifetime = Duration::from_millis(1)..=MAX_EXPIRY;
        let mut out = Vec::new();
        if !lifetime.contains(&config.expiry) { out.push("expiry"); }
        if !lifetime.contains(&config.group_expiry) { out.push("group_expiry"); }
        if config.capacity == 0 { out.push("capacity"); }
        if config.channel_capacity[0].1 == 0 { out.push("channel_capacity"); }
        match InMemoryLayer::try_new(config) {
            Ok(layer) => {
                prop_assert!(out.is_empty(), "accepted with {out:?} out of range");
                exercise(layer);
            }
            Err(err) => assert_names_a_bad_field(&err, &out),
        }
    }

    /// The Redis layers' validation (which `connect` runs before touching
    /// Redis) never panics, and accepts only values the layers' arithmetic
    /// and Redis can hold.
    #[test]
    fn redis_validation_accepts_exactly_the_ranges(config in redis_config()) {
        let mut out = Vec::new();
        let lifetime = Duration::from_secs(1)..=MAX_EXPIRY;
        if !lifetime.contains(&config.expiry) { out.push("expiry"); }
        if !lifetime.contains(&config.group_expiry) { out.push("group_expiry"); }
        if !(Duration::from_secs(1)..=MAX_TIMEOUT).contains(&config.block_timeout) {
            out.push("block_timeout");
        }
        if !(Duration::from_millis(1)..=MAX_TIMEOUT).contains(&config.command_timeout) {
            out.push("command_timeout");
        }
        if config.capacity == 0 { out.push("capacity"); }
        if config.channel_capacity[0].1 == 0 { out.push("channel_capacity"); }
        if !(1..=MAX_MESSAGE_SIZE_LIMIT).contains(&config.max_message_size) {
            out.push("max_message_size");
        }
        match config.validate() {
            Ok(()) => prop_assert!(out.is_empty(), "accepted with {out:?} out of range"),
            Err(err) => assert_names_a_bad_field(&err, &out),
        }
    }
}
