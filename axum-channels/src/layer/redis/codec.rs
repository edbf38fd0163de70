//! Layer messages to bytes and back: a [`LayerMessage`] (a JSON object) as
//! the msgpack map Python's `msgpack.packb` writes, with the queue layer's
//! random prefix and routing field.
//!
//! Encoding follows the wire specification, §3: a map at the top, str keys,
//! strings as str, integers in their smallest form, floats as float64, and
//! `__asgi_channel__` added last. Decoding accepts what Python peers send and
//! turns the rest into a [`DecodeError`] that says what was wrong, so the
//! caller can log one line and drop the payload: a peer's bad message never
//! panics and never affects other channels.

use std::fmt;

use rmpv::Value as Pack;
use serde_json::{Map, Number, Value as Json};

use super::wire::{RANDOM_PREFIX_LENGTH, ROUTING_FIELD};
use crate::layer::{LayerError, LayerMessage};

/// How deep messages may nest (maps and arrays in one another). JSON from
/// `serde_json` stops at 128 anyway; the bound keeps a hostile payload from
/// exhausting the stack.
const MAX_DEPTH: usize = 128;

/// Where a queue-layer message is going, written as `__asgi_channel__`.
pub(crate) enum Route<'a> {
    /// No routing field: plain channels and the pub/sub layer.
    None,
    /// One channel (`send` to a specific channel): a string.
    One(&'a str),
    /// Every member channel of one key (`group_send`): an array.
    Many(&'a [String]),
}

/// Encodes `message` for Redis. `random_prefix` puts the queue layer's 12
/// random bytes in front; `limit` is the largest payload allowed.
pub(crate) fn encode(
    message: &LayerMessage,
    route: Route<'_>,
    random_prefix: bool,
    limit: usize,
) -> Result<Vec<u8>, LayerError> {
    if !message.get("type").is_some_and(Json::is_string) {
        return Err(LayerError::serialize(
            "a layer message needs a string \"type\" field, which receivers dispatch on",
        ));
    }
    if message.contains_key(ROUTING_FIELD) {
        return Err(LayerError::serialize(format!(
            "a layer message must not contain {ROUTING_FIELD:?}: the layer sets it"
        )));
    }
    let mut entries = Vec::with_capacity(message.len() + 1);
    for (key, value) in message {
        entries.push((Pack::from(key.as_str()), to_pack(value, 1)?));
    }
    match route {
        Route::None => {}
        Route::One(channel) => entries.push((Pack::from(ROUTING_FIELD), Pack::from(channel))),
        Route::Many(channels) => entries.push((
            Pack::from(ROUTING_FIELD),
            Pack::Array(channels.iter().map(|c| Pack::from(c.as_str())).collect()),
        )),
    }
    let mut bytes = Vec::with_capacity(64);
    if random_prefix {
        bytes.extend_from_slice(&rand::random::<[u8; RANDOM_PREFIX_LENGTH]>());
    }
    rmpv::encode::write_value(&mut bytes, &Pack::Map(entries))
        .map_err(|err| LayerError::serialize_with("writing msgpack failed", err))?;
    if bytes.len() > limit {
        return Err(LayerError::MessageTooLarge {
            size: bytes.len(),
            limit,
        });
    }
    Ok(bytes)
}

/// The bytes msgpack spends on a str of `len` bytes besides the bytes
/// themselves: fixstr, str8, str16 or str32.
fn str_header(len: usize) -> usize {
    match len {
        0..32 => 1,
        32..256 => 2,
        256..65_536 => 3,
        _ => 5,
    }
}

/// `group_send`'s messages to one Redis key: `message` routed to `names`,
/// split into as few payloads as keep each within `limit`, the names in
/// their order. Each payload is what Python's layer writes for a key, with
/// its routing field listing only that payload's names, and a Python
/// receiver fans each one out as it does any group message, so a key with
/// thousands of members on it (one server's share of a large group) never
/// makes one payload over the limit, which would fail the whole send.
///
/// Returns each payload with how many of `names` it routes to. Fails with
/// [`LayerError::MessageTooLarge`] only when the message with one name is
/// over the limit.
pub(crate) fn encode_many(
    message: &LayerMessage,
    names: &[String],
    limit: usize,
) -> Result<Vec<(Vec<u8>, usize)>, LayerError> {
    let cost = |name: &String| str_header(name.len()) + name.len();
    let base = encode(message, Route::None, true, usize::MAX)?.len();
    let routed = base + 1 + ROUTING_FIELD.len() + names.iter().map(cost).sum::<usize>();
    // The common case, in one encoding, unless it cannot fit (the routing
    // field's key and at least a byte of array header, besides the names):
    // a message to 14,000 names is a megabyte, not worth writing twice.
    if routed <= limit || names.len() <= 1 {
        match encode(message, Route::Many(names), true, limit) {
            Err(LayerError::MessageTooLarge { .. }) if names.len() > 1 => {}
            whole => return whole.map(|payload| vec![(payload, names.len())]),
        }
    }
    // What the routing field adds besides its names, at most: its key
    // (a fixstr of 16), the array's header (array32 at worst), and the
    // map's header growing from fixmap to map16.
    let overhead = 1 + ROUTING_FIELD.len() + 5 + 2;
    let budget = limit.saturating_sub(base + overhead);
    let mut chunks = Vec::new();
    let mut start = 0;
    while start < names.len() {
        let mut end = start;
        let mut size = 0;
        while end < names.len() {
            let cost = cost(&names[end]);
            if end > start && size + cost > budget {
                break;
            }
            size += cost;
            end += 1;
        }
        // A lone name over the budget fails here, with the real size.
        let payload = encode(message, Route::Many(&names[start..end]), true, limit)?;
        chunks.push((payload, end - start));
        start = end;
    }
    Ok(chunks)
}

fn to_pack(value: &Json, depth: usize) -> Result<Pack, LayerError> {
    if depth > MAX_DEPTH {
        return Err(LayerError::serialize(format!(
            "the message nests deeper than {MAX_DEPTH} levels"
        )));
    }
    Ok(match value {
        Json::Null => Pack::Nil,
        Json::Bool(b) => Pack::Boolean(*b),
        Json::Number(n) => {
            if let Some(u) = n.as_u64() {
                Pack::from(u)
            } else if let Some(i) = n.as_i64() {
                Pack::from(i)
            } else {
                Pack::F64(n.as_f64().unwrap_or(f64::NAN))
            }
        }
        Json::String(s) => Pack::from(s.as_str()),
        Json::Array(items) => Pack::Array(
            items
                .iter()
                .map(|item| to_pack(item, depth + 1))
                .collect::<Result<_, _>>()?,
        ),
        Json::Object(map) => Pack::Map(
            map.iter()
                .map(|(k, v)| Ok((Pack::from(k.as_str()), to_pack(v, depth + 1)?)))
                .collect::<Result<_, LayerError>>()?,
        ),
    })
}

/// A message read from Redis: the message without `__asgi_channel__`, and
/// that field's channels if it had one.
#[derive(Debug)]
pub(crate) struct Decoded {
    pub message: LayerMessage,
    pub route: Option<Vec<String>>,
}

/// Why a payload from a peer was dropped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DecodeError(String);

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn fail<T>(why: impl Into<String>) -> Result<T, DecodeError> {
    Err(DecodeError(why.into()))
}

/// A payload from Redis as a message, or `None` after one warning that says
/// why it was dropped: larger than `limit`, or unreadable (another
/// serializer, encryption, a bug in a peer). `from` names the Redis channel
/// or key it came from. Both layers read every payload through here, so a
/// peer's bad message never panics and never affects other channels.
pub(crate) fn read(
    payload: &[u8],
    random_prefix: bool,
    limit: usize,
    from: &str,
) -> Option<Decoded> {
    if payload.len() > limit {
        metrics::counter!("axum_channels_layer_unreadable_total").increment(1);
        tracing::warn!(
            from,
            size = payload.len(),
            limit,
            "dropped a message larger than max_message_size"
        );
        return None;
    }
    match decode(payload, random_prefix) {
        Ok(decoded) => Some(decoded),
        Err(why) => {
            metrics::counter!("axum_channels_layer_unreadable_total").increment(1);
            tracing::warn!(from, %why, "dropped a message this layer cannot read");
            None
        }
    }
}

/// Decodes a payload from Redis; `random_prefix` strips the queue layer's
/// 12 bytes first.
pub(crate) fn decode(payload: &[u8], random_prefix: bool) -> Result<Decoded, DecodeError> {
    let body = if random_prefix {
        match payload.get(RANDOM_PREFIX_LENGTH..) {
            Some(body) => body,
            None => {
                return fail(format!(
                    "{} bytes is shorter than the {RANDOM_PREFIX_LENGTH}-byte random prefix",
                    payload.len()
                ));
            }
        }
    } else {
        payload
    };
    if body.first() == Some(&b'{') {
        return fail(
            "the payload is JSON, not msgpack: the peer uses serializer_format=\"json\"; \
             use the default (msgpack) on every peer",
        );
    }
    let mut reader = body;
    // Each level of nesting costs the reader two units of depth.
    let value = match rmpv::decode::read_value_with_max_depth(&mut reader, 2 * MAX_DEPTH) {
        Ok(value) => value,
        Err(err) => return fail(format!("not valid msgpack ({err})")),
    };
    if !reader.is_empty() {
        return fail(format!(
            "{} bytes follow the msgpack value (another serializer, or encryption?)",
            reader.len()
        ));
    }
    let Pack::Map(entries) = value else {
        return fail(format!(
            "the payload is a msgpack {}, not a map",
            kind(&value)
        ));
    };
    let mut message = Map::new();
    let mut route = None;
    for (key, value) in entries {
        let key = map_key(key)?;
        if key == ROUTING_FIELD {
            route = Some(routing(value)?);
        } else {
            message.insert(key, to_json(value, 1)?);
        }
    }
    if !message.get("type").is_some_and(Json::is_string) {
        return fail("the message has no string \"type\" field");
    }
    Ok(Decoded { message, route })
}

fn kind(value: &Pack) -> &'static str {
    match value {
        Pack::Nil => "nil",
        Pack::Boolean(_) => "boolean",
        Pack::Integer(_) => "integer",
        Pack::F32(_) | Pack::F64(_) => "float",
        Pack::String(_) => "string",
        Pack::Binary(_) => "binary",
        Pack::Array(_) => "array",
        Pack::Map(_) => "map",
        Pack::Ext(..) => "extension",
    }
}

/// Map keys must be text, as Python's `strict_map_key` requires (bin keys
/// that are valid UTF-8 are read as text too).
fn map_key(key: Pack) -> Result<String, DecodeError> {
    match key {
        Pack::String(s) => match s.into_str() {
            Some(s) => Ok(s),
            None => fail("a map key is not valid UTF-8"),
        },
        Pack::Binary(bytes) => {
            String::from_utf8(bytes).or_else(|_| fail("a map key is not valid UTF-8"))
        }
        other => fail(format!("a map key is a {}, not a string", kind(&other))),
    }
}

fn routing(value: Pack) -> Result<Vec<String>, DecodeError> {
    match value {
        Pack::String(s) => match s.into_str() {
            Some(s) => Ok(vec![s]),
            None => fail(format!("{ROUTING_FIELD} is not valid UTF-8")),
        },
        Pack::Array(items) => items
            .into_iter()
            .map(|item| match item {
                Pack::String(s) => s
                    .into_str()
                    .map_or_else(|| fail(format!("{ROUTING_FIELD} is not valid UTF-8")), Ok),
                other => fail(format!("{ROUTING_FIELD} holds a {}", kind(&other))),
            })
            .collect(),
        other => fail(format!(
            "{ROUTING_FIELD} is a {}, not a string or an array",
            kind(&other)
        )),
    }
}

/// msgpack to JSON. Binary (Python `bytes`) becomes an array of byte values,
/// since JSON has no bytes; a NaN or infinite float becomes `null`.
fn to_json(value: Pack, depth: usize) -> Result<Json, DecodeError> {
    if depth > MAX_DEPTH {
        return fail(format!("the message nests deeper than {MAX_DEPTH} levels"));
    }
    Ok(match value {
        Pack::Nil => Json::Null,
        Pack::Boolean(b) => Json::Bool(b),
        Pack::Integer(i) => match (i.as_u64(), i.as_i64()) {
            (Some(u), _) => Json::from(u),
            (None, Some(i)) => Json::from(i),
            (None, None) => return fail("an integer out of range"),
        },
        Pack::F32(f) => Number::from_f64(f64::from(f)).map_or(Json::Null, Json::Number),
        Pack::F64(f) => Number::from_f64(f).map_or(Json::Null, Json::Number),
        Pack::String(s) => match s.into_str() {
            Some(s) => Json::String(s),
            None => return fail("a string is not valid UTF-8"),
        },
        Pack::Binary(bytes) => Json::Array(bytes.into_iter().map(Json::from).collect()),
        Pack::Array(items) => Json::Array(
            items
                .into_iter()
                .map(|item| to_json(item, depth + 1))
                .collect::<Result<_, _>>()?,
        ),
        Pack::Map(entries) => {
            let mut map = Map::new();
            for (key, value) in entries {
                map.insert(map_key(key)?, to_json(value, depth + 1)?);
            }
            Json::Object(map)
        }
        Pack::Ext(kind, _) => {
            return fail(format!("msgpack extension type {kind} is not supported"));
        }
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn msg(value: Json) -> LayerMessage {
        value.as_object().unwrap().clone()
    }

    fn hex(bytes: &[u8]) -> String {
        bytes
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(" ")
    }

    const CHAT: &str =
        "82 a4 74 79 70 65 ac 63 68 61 74 2e 6d 65 73 73 61 67 65 a7 6d 65 73 73 61 67 65 a2 68 69";

    /// The bytes of the wire specification, §3.5. A `LayerMessage` keeps its
    /// keys sorted, so "message" comes before "type", where Python writes
    /// insertion order; readers do not care about the order, and the bytes
    /// are otherwise Python's own.
    #[test]
    fn encodes_the_bytes_python_writes() {
        let map = msg(json!({"type": "chat.message", "message": "hi"}));
        let plain = encode(&map, Route::None, false, 1 << 20).unwrap();
        assert_eq!(
            hex(&plain),
            "82 a7 6d 65 73 73 61 67 65 a2 68 69 a4 74 79 70 65 ac 63 68 61 74 2e 6d 65 73 73 61 67 65"
        );
        let decoded = decode(&plain, false).unwrap();
        assert_eq!(decoded.message, map);
        assert!(decoded.route.is_none());

        // Python's own bytes decode to the same message.
        let python: Vec<u8> = CHAT
            .split(' ')
            .map(|b| u8::from_str_radix(b, 16).unwrap())
            .collect();
        assert_eq!(decode(&python, false).unwrap().message, map);
    }

    #[test]
    fn routing_field_is_last_as_a_string_or_an_array() {
        let name = "specific.d0a712bf8a1f4369ba8d0a9a466b4511!56d0c51210de4166a46dc93a92d52605";
        let m = msg(json!({"type": "chat.message", "message": "hi"}));
        let one = encode(&m, Route::One(name), true, 1 << 20).unwrap();
        assert_eq!(one.len(), 135, "the length Python writes");
        let tail = hex(&one[one.len() - 76..]);
        assert!(tail.starts_with("d9 4a 73 70"), "str8 of 74 bytes: {tail}");
        assert_eq!(hex(&one[12..13]), "83");
        let names = vec![name.to_owned()];
        let many = encode(&m, Route::Many(&names), true, 1 << 20).unwrap();
        assert_eq!(many.len(), 136, "the length Python writes");
        assert_eq!(hex(&many[many.len() - 77..many.len() - 74]), "91 d9 4a");
        let decoded = decode(&many, true).unwrap();
        assert_eq!(decoded.message, m);
        assert_eq!(decoded.route, Some(names));
    }

    #[test]
    fn values_round_trip_and_match_python_types() {
        let m = msg(json!({
            "type": "t", "i": 1, "neg": -5, "big": 1u64 << 40, "f": 1.5, "b": true,
            "n": null, "list": [1, "a"], "nested": {"k": "v"}, "uni": "🌍", "max": u64::MAX,
            "min": i64::MIN,
        }));
        let bytes = encode(&m, Route::None, false, 1 << 20).unwrap();
        assert_eq!(decode(&bytes, false).unwrap().message, m);
        let text = hex(&bytes);
        for expected in [
            "a3 6e 65 67 fb",                         // "neg": -5 as a negative fixint
            "a3 62 69 67 cf 00 00 01 00 00 00 00 00", // 2**40 as uint64
            "a1 66 cb 3f f8 00 00 00 00 00 00",       // 1.5 as float64
            "a3 75 6e 69 a4 f0 9f 8c 8d",             // "uni": "🌍"
        ] {
            assert!(text.contains(expected), "{expected} missing from {text}");
        }
        // Python bytes (bin 8) arrive as an array of byte values.
        let python_bytes = [0x81, 0xa4, b't', b'y', b'p', b'e', 0xc4, 0x02, 0x00, 0x01];
        assert!(
            decode(&python_bytes, false).is_err(),
            "a bin \"type\" is no string type"
        );
        let with_bytes = [
            0x82, 0xa4, b't', b'y', b'p', b'e', 0xa1, b't', 0xa1, b'b', 0xc4, 0x02, 0x00, 0x01,
        ];
        assert_eq!(
            decode(&with_bytes, false).unwrap().message,
            msg(json!({"type": "t", "b": [0, 1]}))
        );
    }

    #[test]
    fn bad_payloads_are_errors_that_say_why() {
        let cases: [(&[u8], &str); 8] = [
            (b"", "not valid msgpack"),
            (b"\x92\x01\x02", "array, not a map"),
            (b"\x81\xa1a\x01", "no string \"type\""),
            (b"{\"type\": \"x\"}", "serializer_format=\"json\""),
            (b"\x81\x01\xa1a", "integer, not a string"),
            (b"\x81\xa4type\xa1a\xff", "follow the msgpack value"),
            (b"\x82\xa4type\xa1a\xa1x\xd4\x01\x00", "extension"),
            (b"\x81\xa4type\xa2\xff\xfe", "UTF-8"),
        ];
        for (payload, why) in cases {
            let err = decode(payload, false).unwrap_err().to_string();
            assert!(err.contains(why), "{payload:?}: {err}");
        }
        assert!(
            decode(b"short", true)
                .unwrap_err()
                .to_string()
                .contains("random prefix")
        );
        // A deeply nested payload is refused, not a stack overflow.
        let mut deep = b"\x82\xa4type\xa1t\xa1x".to_vec();
        deep.extend(std::iter::repeat_n(0x91u8, 100_000));
        deep.push(0x01);
        assert!(decode(&deep, false).is_err());
    }

    #[test]
    fn a_group_message_over_the_limit_is_split_by_names_in_order() {
        let m = msg(json!({"type": "chat.message", "message": "hi"}));
        let names: Vec<String> = (0..100)
            .map(|i| format!("specific.d0a712bf8a1f4369ba8d0a9a466b4511!{i:032x}"))
            .collect();
        let whole = encode(&m, Route::Many(&names), true, usize::MAX).unwrap();
        let one = encode_many(&m, &names, whole.len()).unwrap();
        assert_eq!(one.len(), 1, "at the limit: one payload, as before");
        assert_eq!((one[0].0.len(), one[0].1), (whole.len(), 100));

        for limit in [whole.len() - 1, 1_000, 400, 150] {
            let chunks = encode_many(&m, &names, limit).unwrap();
            assert!(chunks.len() > 1, "limit {limit}: split");
            let mut routed: Vec<String> = Vec::new();
            for (payload, count) in &chunks {
                assert!(payload.len() <= limit, "{} > {limit}", payload.len());
                let decoded = decode(payload, true).unwrap();
                assert_eq!(decoded.message, m);
                let route = decoded.route.unwrap();
                assert_eq!(route.len(), *count);
                // As full as fits: one name more would pass the limit,
                // give or take the few bytes the estimate keeps spare.
                let (first, next) = (routed.len(), routed.len() + count);
                if next < names.len() {
                    let more = encode(&m, Route::Many(&names[first..=next]), true, usize::MAX);
                    assert!(more.unwrap().len() > limit - 8, "limit {limit}: not full");
                }
                routed.extend(route);
            }
            assert_eq!(routed, names, "limit {limit}: every name once, in order");
        }
        assert!(matches!(
            encode_many(&m, &names, 100),
            Err(LayerError::MessageTooLarge { limit: 100, .. })
        ));
    }

    #[test]
    fn messages_the_layer_cannot_send_are_refused() {
        let limit = 100;
        let big = msg(json!({"type": "t", "data": "x".repeat(200)}));
        assert!(matches!(
            encode(&big, Route::None, true, limit),
            Err(LayerError::MessageTooLarge { limit: 100, .. })
        ));
        let untyped = msg(json!({"message": "hi"}));
        assert!(matches!(
            encode(&untyped, Route::None, false, limit),
            Err(LayerError::Serialize { .. })
        ));
        let routed = msg(json!({"type": "t", "__asgi_channel__": "x"}));
        assert!(matches!(
            encode(&routed, Route::None, false, limit),
            Err(LayerError::Serialize { .. })
        ));
    }
}
