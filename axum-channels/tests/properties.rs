//! Properties that must hold for every input, not just the examples the
//! other tests pick: checked with `proptest` on thousands of generated
//! strings and frames.

use axum_channels::InvalidMessage;
use axum_channels::layer::{group_name_for, validate_group_name};
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
