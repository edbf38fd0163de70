//! The solution to chapter 6's exercise, checked: a client's list of who is
//! in the room, from `presence_state` and `presence_diff` frames that may
//! arrive out of order. The solution is `Members`, in `tests/rooms/mod.rs`
//! (the tests with real servers use it too); the chapter shows it folded,
//! below its hints.

mod rooms;

use rooms::Members;
use serde_json::json;

fn names(list: &Members) -> Vec<String> {
    list.present().into_iter().collect()
}

#[test]
fn diffs_apply_in_version_order_whatever_order_they_arrive_in() {
    let state = json!({"type": "presence_state", "version": 4, "members": ["alice", "bob"]});
    // Server A saw bob leave (version 5); server B then saw him come back
    // (version 6). B's diff arrives first.
    let left = json!({"type": "presence_diff", "version": 5, "joins": [], "leaves": ["bob"]});
    let back = json!({"type": "presence_diff", "version": 6, "joins": ["bob"], "leaves": []});
    let mut list = Members::default();
    list.apply(&state);
    list.apply(&back);
    list.apply(&left);
    assert_eq!(names(&list), ["alice", "bob"], "the late leave is older");
    // In the order they were read, the same result.
    let mut list = Members::default();
    list.apply(&state);
    list.apply(&left);
    list.apply(&back);
    assert_eq!(names(&list), ["alice", "bob"]);
}

#[test]
fn a_diff_older_than_the_state_changes_nothing() {
    // Carol left at version 3, a diff read before this client's state
    // (version 7) but delivered after it.
    let state = json!({"type": "presence_state", "version": 7, "members": ["alice"]});
    let stale =
        json!({"type": "presence_diff", "version": 3, "joins": ["carol"], "leaves": ["alice"]});
    let mut list = Members::default();
    list.apply(&state);
    list.apply(&stale);
    assert_eq!(names(&list), ["alice"]);
    let message =
        json!({"type": "message", "offset": 1, "epoch": "e", "name": "alice", "text": "hi"});
    list.apply(&message);
    assert_eq!(names(&list), ["alice"], "other frames are ignored");
}
