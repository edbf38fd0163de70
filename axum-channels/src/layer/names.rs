//! The naming rules for channels and groups, and a safe way to derive a
//! group name from text people type.
//!
//! The rules are Django Channels', so names mean the same on every backend
//! and in every language: ASCII letters, digits, `-`, `_` and `.`, fewer than
//! 100 characters. A channel name may also hold one `!`, which Django uses for
//! channels local to one process.

use sha2::{Digest, Sha256};

use super::{LayerError, NameKind};

/// Names must be shorter than this.
pub const MAX_NAME_LENGTH: usize = 100;

fn allowed(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.')
}

/// Checks a channel name.
pub fn validate_channel_name(name: &str) -> Result<(), LayerError> {
    let (head, tail) = match name.split_once('!') {
        Some((head, tail)) => (head, tail),
        None => (name, ""),
    };
    let valid = !head.is_empty()
        && name.len() < MAX_NAME_LENGTH
        && head.bytes().all(allowed)
        && tail.bytes().all(allowed);
    if valid {
        Ok(())
    } else {
        Err(LayerError::InvalidName {
            kind: NameKind::Channel,
            name: name.to_owned(),
        })
    }
}

/// Checks a group name.
pub fn validate_group_name(name: &str) -> Result<(), LayerError> {
    if !name.is_empty() && name.len() < MAX_NAME_LENGTH && name.bytes().all(allowed) {
        Ok(())
    } else {
        Err(LayerError::InvalidName {
            kind: NameKind::Group,
            name: name.to_owned(),
        })
    }
}

/// A valid group name for any `text`, such that different texts never share
/// a group: `group_name_for("room", "general")` is `room_general`.
///
/// Letters, digits, `-` and `.` are kept; every other character, `_`
/// included, becomes `_` and two hex digits per UTF-8 byte, so `a b` becomes
/// `room_a_20b` and `a_b` becomes `room_a_5fb`. Because `_` always starts
/// exactly two hex digits, the name can be read back, so two texts can never
/// meet. When that would be too long, the name is `room-` and the SHA-256 of
/// the text instead (the `-` keeps both forms apart).
///
/// `prefix` must itself be a valid group name, e.g. `"room"`.
pub fn group_name_for(prefix: &str, text: &str) -> String {
    let mut name = format!("{prefix}_");
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.') {
            name.push(char::from(byte));
        } else {
            name.push_str(&format!("_{byte:02x}"));
        }
    }
    if name.len() < MAX_NAME_LENGTH {
        return name;
    }
    let digest = Sha256::digest(text.as_bytes());
    let hex: String = digest.iter().map(|byte| format!("{byte:02x}")).collect();
    format!("{prefix}-{hex}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_names_follow_django_rules() {
        for good in ["chat", "a.b-c_d", "specific.inmemory!abc123", "x!"] {
            assert!(validate_channel_name(good).is_ok(), "{good}");
        }
        let too_long = "a".repeat(MAX_NAME_LENGTH);
        for bad in [
            "",
            "with space",
            "two!bangs!",
            "!tail",
            "café",
            too_long.as_str(),
        ] {
            assert!(validate_channel_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn group_names_allow_no_bang() {
        assert!(validate_group_name("room_general").is_ok());
        assert!(validate_group_name("a!b").is_err());
        assert!(validate_group_name(&"g".repeat(99)).is_ok());
        assert!(validate_group_name(&"g".repeat(100)).is_err());
    }

    #[test]
    fn derived_group_names_are_valid_and_distinct() {
        let rooms = [
            "general",
            "a b",
            "a_b",
            "a_20b",
            "café",
            "team alpha",
            "日本",
            "A",
            "a",
        ];
        let names: Vec<String> = rooms
            .iter()
            .map(|room| group_name_for("room", room))
            .collect();
        for name in &names {
            assert!(validate_group_name(name).is_ok(), "{name}");
        }
        let distinct: std::collections::HashSet<_> = names.iter().collect();
        assert_eq!(distinct.len(), names.len(), "{names:?}");
        assert_eq!(names[0], "room_general");
        assert_eq!(names[1], "room_a_20b");
        assert_eq!(names[2], "room_a_5fb");
        assert_eq!(names[4], "room_caf_c3_a9");
    }

    #[test]
    fn long_names_are_hashed_and_stay_valid() {
        let long = "日本語".repeat(21); // 63 characters, 189 bytes
        let name = group_name_for("room", &long);
        assert!(name.starts_with("room-"));
        assert!(validate_group_name(&name).is_ok());
        assert_ne!(name, group_name_for("room", &"日本語".repeat(20)));
    }
}
