//! The naming rules for channels and groups, a safe way to derive a group
//! name from text people type, and the patterns that pick a channel's
//! capacity by its name.
//!
//! The rules are Django Channels', so names mean the same on every backend
//! and in every language: ASCII letters, digits, `-`, `_` and `.`, fewer than
//! 100 characters. A channel name may also hold one `!`, which Django uses for
//! channels local to one process. One rule is ours: a channel name may not
//! hold [`GROUP_MARKER`], because on the pub/sub layer
//! `{prefix}__group__{group}` is the Redis channel of a group, so a `send` to
//! such a name would reach every member of a group (of this layer, or of
//! another layer with another prefix on the same Redis). Every layer refuses
//! it, so a name that works in memory works on Redis too.

use sha2::{Digest, Sha256};

use super::{LayerError, NameKind};

/// Names must be shorter than this.
pub const MAX_NAME_LENGTH: usize = 100;

/// What no channel name may hold: the pub/sub layer's group channels are
/// `{prefix}__group__{group}`.
pub const GROUP_MARKER: &str = "__group__";

fn allowed(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.')
}

/// True when `name` follows Django's rules for a channel name.
pub(crate) fn follows_django_rules(name: &str) -> bool {
    let (head, tail) = match name.split_once('!') {
        Some((head, tail)) => (head, tail),
        None => (name, ""),
    };
    !head.is_empty()
        && name.len() < MAX_NAME_LENGTH
        && head.bytes().all(allowed)
        && tail.bytes().all(allowed)
}

/// Checks a channel name: Django's rules, and no [`GROUP_MARKER`].
pub fn validate_channel_name(name: &str) -> Result<(), LayerError> {
    if follows_django_rules(name) && !name.contains(GROUP_MARKER) {
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

/// The capacity of `channel`: that of the first pattern in `patterns` it
/// matches (see [`fnmatch`]), or `default`. Every layer picks capacities
/// with this, so a pattern means the same on every backend.
pub(crate) fn capacity_of(patterns: &[(String, usize)], default: usize, channel: &str) -> usize {
    patterns
        .iter()
        .find(|(pattern, _)| fnmatch(pattern, channel))
        .map_or(default, |(_, capacity)| *capacity)
}

/// Python's `fnmatch.fnmatchcase` on the whole name, as the Python layers
/// match `channel_capacity`: `*` (any run of characters), `?` (one
/// character), `[abc]`, `[a-z]` and `[!abc]` (a character class);
/// everything else matches itself. Linear in practice: a `*` only ever
/// backtracks to the last `*` (the classic two-pointer match).
pub(crate) fn fnmatch(pattern: &str, name: &str) -> bool {
    let pattern: Vec<char> = pattern.chars().collect();
    let name: Vec<char> = name.chars().collect();
    let (mut p, mut n) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while n < name.len() {
        if p < pattern.len() {
            match pattern[p] {
                '*' => {
                    star = Some((p, n));
                    p += 1;
                    continue;
                }
                '?' => {
                    p += 1;
                    n += 1;
                    continue;
                }
                '[' => {
                    if let Some((matched, next)) = class_match(&pattern, p, name[n]) {
                        if matched {
                            p = next;
                            n += 1;
                            continue;
                        }
                    } else if name[n] == '[' {
                        // An unclosed '[' is a literal, as in fnmatch.
                        p += 1;
                        n += 1;
                        continue;
                    }
                }
                literal if literal == name[n] => {
                    p += 1;
                    n += 1;
                    continue;
                }
                _ => {}
            }
        }
        match star {
            Some((star_p, star_n)) => {
                p = star_p + 1;
                n = star_n + 1;
                star = Some((star_p, star_n + 1));
            }
            None => return false,
        }
    }
    pattern[p..].iter().all(|&c| c == '*')
}

/// Matches `c` against the class starting at `pattern[open] == '['`.
/// Returns whether it matched and the index after the class, or `None` if
/// the class is not closed.
fn class_match(pattern: &[char], open: usize, c: char) -> Option<(bool, usize)> {
    let mut i = open + 1;
    let negated = matches!(pattern.get(i), Some('!'));
    if negated {
        i += 1;
    }
    let start = i;
    let mut matched = false;
    while i < pattern.len() {
        // A ']' right after the opening (or after '!') is a literal.
        if pattern[i] == ']' && i > start {
            return Some((matched != negated, i + 1));
        }
        if i + 2 < pattern.len() && pattern[i + 1] == '-' && pattern[i + 2] != ']' {
            if pattern[i] <= c && c <= pattern[i + 2] {
                matched = true;
            }
            i += 3;
        } else {
            if pattern[i] == c {
                matched = true;
            }
            i += 1;
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_follow_fnmatch() {
        let cases = [
            ("background-jobs*", "background-jobs", true),
            ("background-jobs*", "background-jobs.specific!x", true),
            ("background-jobs*", "other", false),
            ("exact", "exact", true),
            ("exact", "exactly", false),
            ("a?c", "abc", true),
            ("a?c", "ac", false),
            ("*.jobs", "worker.jobs", true),
            ("*.jobs", "worker.jobs.x", false),
            ("*a*b*", "xxaxxbxx", true),
            ("*a*b*", "xxbxxaxx", false),
            ("[ab]x", "bx", true),
            ("[!ab]x", "bx", false),
            ("[!ab]x", "cx", true),
            ("[a-c]1", "b1", true),
            ("[a-c]1", "d1", false),
            ("[]]", "]", true),
            ("[", "[", true),
            ("*", "", true),
            ("", "", true),
            ("", "a", false),
        ];
        for (pattern, name, expected) in cases {
            assert_eq!(fnmatch(pattern, name), expected, "{pattern:?} vs {name:?}");
        }
    }

    #[test]
    fn the_first_matching_pattern_picks_the_capacity() {
        let patterns = [("jobs*".to_owned(), 3), ("jobs.urgent".to_owned(), 1)];
        assert_eq!(capacity_of(&patterns, 5, "jobs.urgent"), 3);
        assert_eq!(capacity_of(&patterns, 5, "jobs"), 3);
        assert_eq!(capacity_of(&patterns, 5, "chat"), 5);
    }

    #[test]
    fn channel_names_may_not_look_like_a_group_channel() {
        for name in ["asgi__group__room", "__group__", "chat__group__x!y"] {
            assert!(follows_django_rules(name), "{name}");
            let err = validate_channel_name(name).unwrap_err();
            let shown = err.to_string();
            assert!(
                shown.contains("__group__") && shown.contains(name),
                "{shown}"
            );
        }
        assert!(validate_channel_name("asgi_group_room").is_ok());
        assert!(validate_group_name("__group__").is_ok(), "a group may");
    }

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
