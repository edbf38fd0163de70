"""The Python tutorial's external sender, run against a Rust server.

Step 04's tests/external_sender.rs runs this script with the virtualenv of
channels-testkit/src/python.rs, so the layers below are fast-channels 1.0.2
from PyPI.
It does what the original ``sandbox/external_sender.py`` does, in the same
order, with the same messages and the same console output:

- it registers the sandbox's four layers (``sandbox/layers.py``) under their
  aliases, with their settings, on the Redis of ``REDIS_URL``;
- it runs the six examples, each announced with ``🎯 Running: <name>``, its
  errors printed and skipped, a blank line and a pause after each.

Only two things differ, both for tests: the pauses (0.5 s, 0.1 s and 1 s in
the original) are all ``--pause`` seconds when it is given, and the layers
are built from the fast-channels 1.0.2 classes directly (the sandbox's
``create_redis_channel_layer`` helper is not in that release).

The whole run is bounded by ``--timeout``, so no process outlives a test.
"""

import argparse
import asyncio
import os
import sys

from fast_channels.layers import get_channel_layer
from fast_channels.layers.redis import RedisChannelLayer, RedisPubSubChannelLayer
from fast_channels.layers.registry import register_channel_layer


# ANCHOR: setup_layers
def setup_layers(redis_url):
    """The sandbox's layers, as sandbox/layers.py registers them."""
    hosts = [redis_url]
    register_channel_layer("chat", RedisPubSubChannelLayer(hosts=hosts, prefix="chat"))
    register_channel_layer(
        "queue", RedisChannelLayer(hosts=hosts, prefix="queue", expiry=900, capacity=1000)
    )
    register_channel_layer(
        "notifications", RedisPubSubChannelLayer(hosts=hosts, prefix="notify")
    )
    register_channel_layer(
        "analytics",
        RedisChannelLayer(hosts=hosts, prefix="analytics", expiry=3600, capacity=5000),
    )
# ANCHOR_END: setup_layers


class Sender:
    def __init__(self, pause):
        self.pause_override = pause
        self.chat_layer = get_channel_layer("chat")
        self.queue_layer = get_channel_layer("queue")
        self.notifications_layer = get_channel_layer("notifications")
        self.analytics_layer = get_channel_layer("analytics")

    async def pause(self, seconds):
        await asyncio.sleep(seconds if self.pause_override is None else self.pause_override)

    async def send_chat_message(self):
        await self.chat_layer.group_send(
            "chat_room",
            {"type": "chat_message", "message": "🔔 System announcement: Welcome to the chat!"},
        )
        print("✅ Chat message sent!")

    async def send_reliable_message(self):
        await self.queue_layer.group_send(
            "reliable_chat",
            {
                "type": "reliable_chat_message",
                "message": "🔒 Important: System maintenance scheduled for tonight",
            },
        )
        print("✅ Reliable message sent!")

    async def send_notification(self):
        await self.notifications_layer.group_send(
            "notifications",
            {
                "type": "notification_message",
                "data": {"type": "system", "message": "🚨 Alert: High CPU usage detected on server"},
            },
        )
        print("✅ Notification sent!")

    async def send_analytics_event(self):
        events = [
            "user_login:john_doe",
            "page_view:/dashboard",
            "button_click:export_data",
            "session_duration:1234",
            "error:api_timeout",
        ]
        for event in events:
            await self.analytics_layer.group_send(
                "analytics", {"type": "analytics_message", "message": f"📊 Event: {event}"}
            )
            await self.pause(0.1)
        print(f"✅ Sent {len(events)} analytics events!")

    async def send_to_multiple_layers(self):
        print("🚀 Broadcasting to multiple layers...")
        await self.chat_layer.group_send(
            "chat_room",
            {"type": "chat_message", "message": "💬 Multi-layer broadcast: Chat message"},
        )
        await self.notifications_layer.group_send(
            "notifications",
            {
                "type": "notification_message",
                "data": {"type": "broadcast", "message": "🔔 Multi-layer broadcast: Notification"},
            },
        )
        await self.queue_layer.group_send(
            "reliable_chat",
            {"type": "reliable_chat_message", "message": "📨 Multi-layer broadcast: Reliable message"},
        )
        print("✅ Multi-layer broadcast complete!")

    async def periodic_announcements(self):
        print("⏰ Starting periodic announcements...")
        for i in range(3):
            if i % 2 == 0:
                await self.chat_layer.group_send(
                    "chat_room",
                    {"type": "chat_message", "message": f"⏰ Hourly chat announcement #{i+1}"},
                )
            else:
                await self.notifications_layer.group_send(
                    "notifications",
                    {
                        "type": "notification_message",
                        "data": {"type": "periodic", "message": f"🔔 System status update #{i+1}"},
                    },
                )
            print(f"✅ Sent announcement #{i+1}")
            await self.pause(1)
        print("✅ Periodic announcements complete!")

    async def close(self):
        # Closes the pub/sub layers' connections and reader tasks; it deletes
        # nothing in Redis. The queue layers' flush would, so it is not called.
        await self.chat_layer.flush()
        await self.notifications_layer.flush()


async def main(pause):
    print("=== External Messaging with Centralized Layers ===\n")
    sender = Sender(pause)
    examples = [
        ("Chat Message", sender.send_chat_message),
        ("Reliable Message", sender.send_reliable_message),
        ("Notification", sender.send_notification),
        ("Analytics Events", sender.send_analytics_event),
        ("Multi-layer Broadcast", sender.send_to_multiple_layers),
        ("Periodic Announcements", sender.periodic_announcements),
    ]
    for name, func in examples:
        print(f"🎯 Running: {name}")
        try:
            await func()
        except Exception as e:
            print(f"❌ Error in {name}: {e}")
        print()
        await sender.pause(0.5)
    print("=== All Examples Complete! ===")
    await sender.close()


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pause", type=float, help="every pause, in seconds (default: the original's)")
    parser.add_argument("--timeout", type=float, default=30.0, help="bound on the whole run, in seconds")
    return parser.parse_args(argv)


if __name__ == "__main__":
    args = parse_args(sys.argv[1:])
    redis_url = os.environ.get("REDIS_URL")
    if not redis_url:
        sys.exit("error: REDIS_URL is not set")
    setup_layers(redis_url)
    # Line by line, as a terminal would show it, even into a pipe.
    sys.stdout.reconfigure(line_buffering=True)
    try:
        asyncio.run(asyncio.wait_for(main(args.pause), args.timeout))
    except asyncio.TimeoutError:
        sys.exit(f"error: timed out after {args.timeout} s")
