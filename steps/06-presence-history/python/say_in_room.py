"""Says one line in a room of step 06, from Python.

A Python program that shares the servers' Redis, through fast-channels'
pub/sub layer configured as the Rust app's "chat" layer (same hosts, in the
same order, and prefix "chat"), sends the room's group the event a room
consumer handles: {"type": "room_message", "message": "..."}. Every member
of the room hears it, on whichever server its connection is.

    REDIS_URL=redis://127.0.0.1:6379 python say_in_room.py lobby "hello"

REDIS_URL is the servers': one URL, or several comma-separated (shards).
Needs fast-channels from PyPI (tested with 1.0.2).
"""

import asyncio
import os
import sys

from fast_channels.layers.redis import RedisPubSubChannelLayer

# The longest group name the layers accept is 99 characters.
MAX_GROUP_NAME = 99


# ANCHOR: group_name
def group_name_for(room):
    """The room's group, as the Rust app names it (`group_name_for("room",
    room)`): letters, digits, '-' and '.' kept, every other byte '_' and two
    hex digits. `lobby` is `room_lobby`, `a b` is `room_a_20b`."""
    name = "room_"
    for byte in room.encode("utf-8"):
        char = chr(byte)
        if char.isascii() and (char.isalnum() or char in "-."):
            name += char
        else:
            name += f"_{byte:02x}"
    if len(name) > MAX_GROUP_NAME:
        # The Rust app hashes such names; this script keeps to short ones.
        sys.exit("error: that room name is too long for this script")
    return name
# ANCHOR_END: group_name


# ANCHOR: say
async def say(hosts, room, text):
    layer = RedisPubSubChannelLayer(hosts=hosts, prefix="chat")
    try:
        await layer.group_send(
            group_name_for(room), {"type": "room_message", "message": f"🐍 {text}"}
        )
    finally:
        # Closes its connections; the pub/sub layer keeps nothing in Redis.
        await layer.flush()
    print(f"✅ Said in room {room!r}: {text}")
# ANCHOR_END: say


def main():
    if len(sys.argv) != 3:
        sys.exit('usage: REDIS_URL=redis://... python say_in_room.py ROOM "TEXT"')
    url = os.environ.get("REDIS_URL", "")
    hosts = [host.strip() for host in url.split(",") if host.strip()]
    if not hosts:
        sys.exit("error: set REDIS_URL to the servers' Redis, e.g. redis://127.0.0.1:6379")
    room, text = sys.argv[1], sys.argv[2]
    if not room:
        sys.exit("error: the room name is empty")
    asyncio.run(asyncio.wait_for(say(hosts, room, text), 10))


if __name__ == "__main__":
    main()
