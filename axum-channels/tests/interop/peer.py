"""A real Python channel-layer peer for the Rust interop tests.

tests/python_interop.rs runs this script with the virtualenv that
channels-testkit/src/python.rs builds from requirements.txt, so the layers
below are the genuine PyPI packages, never a re-implementation:

- ``--impl fast``: ``fast_channels.layers.redis.RedisChannelLayer`` (queue) or
  ``RedisPubSubChannelLayer`` (pub/sub), built directly as a fast-channels app
  does;
- ``--impl django``: ``channels_redis.core.RedisChannelLayer`` or
  ``channels_redis.pubsub.RedisPubSubChannelLayer``, configured through
  Django's ``CHANNEL_LAYERS`` setting and fetched with
  ``channels.layers.get_channel_layer()``, as a Django project does.

Every command prints JSON lines on stdout, flushed one by one, so the Rust
side can react to each as it comes:

- ``listen [--group G]... [--channels K | --channel NAME] [--count N]``:
  makes K channels with ``new_channel()`` (or receives on the given NAME),
  adds each to every group, prints
  ``{"event": "ready", "layer": ..., "channels": [...]}`` once the layer is
  really listening, then ``{"event": "message", "channel": c, "message": m}``
  for each message, and ``{"event": "done"}`` after N messages;
- ``send CHANNEL JSON`` / ``group_send GROUP JSON``: prints
  ``{"event": "sent", "layer": ...}``;
- ``hash NAME... --ring-sizes 2,3,4,5``: prints the package's own
  ``consistent_hash`` of each name for each ring size.

Nothing here may hang a test: the whole run is bounded by ``--timeout``, and a
listener also stops when its stdin closes (the Rust test ended or died).
Failures print ``{"event": "error", ...}``, the traceback goes to stderr, and
the exit status is non-zero.
"""

import argparse
import asyncio
import json
import sys
import traceback


def emit(**fields):
    """One JSON line on stdout, flushed at once: the Rust side waits for it."""
    sys.stdout.write(json.dumps(fields, ensure_ascii=False) + "\n")
    sys.stdout.flush()


def layer_options(args):
    """The options both Python packages take, from the command line."""
    if args.kind == "queue":
        return {
            "hosts": args.url,
            "prefix": args.prefix,
            "expiry": args.expiry,
            "group_expiry": args.group_expiry,
            "capacity": args.capacity,
        }
    # The pub/sub layers accept and ignore expiry and capacity (spec 2.1), so
    # they are not passed: what is tested is what a real app configures.
    return {"hosts": args.url, "prefix": args.prefix}


def make_layer(args):
    """The real layer object of the chosen package and kind."""
    options = layer_options(args)
    if args.impl == "fast":
        from fast_channels.layers.redis import RedisChannelLayer, RedisPubSubChannelLayer

        cls = RedisChannelLayer if args.kind == "queue" else RedisPubSubChannelLayer
        return cls(**options)

    # Django Channels: the layer comes from settings, exactly as in a project.
    # Only what channels needs is configured; no app, no database.
    import django
    from django.conf import settings

    backend = {
        "queue": "channels_redis.core.RedisChannelLayer",
        "pubsub": "channels_redis.pubsub.RedisPubSubChannelLayer",
    }[args.kind]
    settings.configure(
        CHANNEL_LAYERS={"default": {"BACKEND": backend, "CONFIG": options}},
        INSTALLED_APPS=[],
    )
    django.setup()
    from channels.layers import get_channel_layer

    return get_channel_layer()


def layer_name(layer):
    cls = type(layer)
    return f"{cls.__module__}.{cls.__qualname__}"


async def wait_until_subscribed(args, names):
    """Waits until Redis has every pub/sub subscription of this process.

    The Python pub/sub layers only *write* SUBSCRIBE and return (redis-py reads
    the confirmation later, in the layer's reader task), so "ready" printed
    right after group_add could let a Rust publish overtake the SUBSCRIBE.
    PUBSUB NUMSUB, asked on every host, says when Redis has it.
    """
    from redis import asyncio as aioredis

    clients = [aioredis.Redis.from_url(url) for url in args.url]
    try:
        while True:
            counts = dict.fromkeys(names, 0)
            for client in clients:
                for name, count in await client.pubsub_numsub(*names):
                    counts[name.decode() if isinstance(name, bytes) else name] += count
            if all(counts.values()):
                return
            await asyncio.sleep(0.01)
    finally:
        for client in clients:
            await client.aclose()


async def listen(args, layer):
    first = {}
    if args.channel:
        channels = [args.channel]
        if args.kind == "pubsub":
            # The pub/sub layer subscribes a named channel on its first
            # receive() (spec 2.3), and group_add needs it subscribed: start
            # that receive now, and let it run up to its SUBSCRIBE.
            first[args.channel] = asyncio.ensure_future(layer.receive(args.channel))
            await asyncio.sleep(0)
    else:
        channels = [await layer.new_channel() for _ in range(args.channels)]
    for group in args.group:
        for channel in channels:
            await layer.group_add(group, channel)
    if args.kind == "pubsub":
        names = channels + [f"{args.prefix}__group__{g}" for g in args.group]
        await wait_until_subscribed(args, names)
    emit(event="ready", layer=layer_name(layer), channels=channels)

    # One receiving task per channel, all feeding one queue, so messages are
    # printed in the order they arrive whichever channel they came on.
    arrived = asyncio.Queue()

    async def pump(channel):
        if channel in first:
            await arrived.put((channel, await first[channel]))
        while True:
            await arrived.put((channel, await layer.receive(channel)))

    tasks = [asyncio.ensure_future(pump(channel)) for channel in channels]
    try:
        for _ in range(args.count):
            channel, message = await arrived.get()
            emit(event="message", channel=channel, message=message)
        emit(event="done")
    finally:
        for task in tasks + list(first.values()):
            task.cancel()
        await asyncio.gather(*tasks, *first.values(), return_exceptions=True)


async def run(args):
    if args.command == "hash":
        if args.impl == "fast":
            from fast_channels.layers.redis.utils import consistent_hash
        else:
            from channels_redis.utils import _consistent_hash as consistent_hash
        sizes = [int(n) for n in args.ring_sizes.split(",")]
        emit(
            event="hash",
            function=f"{consistent_hash.__module__}.{consistent_hash.__name__}",
            results=[
                {"name": name, "ring_size": n, "index": consistent_hash(name, n)}
                for name in args.names
                for n in sizes
            ],
        )
        return

    layer = make_layer(args)
    try:
        if args.command == "listen":
            await listen(args, layer)
        elif args.command == "send":
            await layer.send(args.channel, json.loads(args.message))
            emit(event="sent", layer=layer_name(layer))
        elif args.command == "group_send":
            await layer.group_send(args.group, json.loads(args.message))
            emit(event="sent", layer=layer_name(layer))
    finally:
        if args.kind == "pubsub":
            # Closes the pub/sub connections and reader tasks; it touches no
            # data in Redis (spec 2.3). The queue layer's flush would delete
            # keys, so it is not called.
            await layer.flush()


class _StdinWatch(asyncio.Protocol):
    """Cancels the run when stdin reaches its end."""

    def __init__(self, task):
        self.task = task

    def eof_received(self):
        self.task.cancel()

    def connection_lost(self, exc):
        self.task.cancel()


async def stop_when_stdin_closes(main_task):
    """Ends a listener whose Rust test has gone, so no peer outlives it.

    Read through the event loop rather than a thread: a thread blocked in
    read() makes the interpreter abort at exit.
    """
    loop = asyncio.get_running_loop()
    try:
        await loop.connect_read_pipe(lambda: _StdinWatch(main_task), sys.stdin)
    except (ValueError, OSError):
        pass  # stdin is a terminal or a file: the --timeout bound remains


async def main(args):
    task = asyncio.ensure_future(run(args))
    if args.command == "listen":
        await stop_when_stdin_closes(task)
    try:
        await asyncio.wait_for(task, args.timeout)
    except asyncio.TimeoutError:
        emit(event="error", error=f"timed out after {args.timeout} s")
        return 3
    except asyncio.CancelledError:
        emit(event="error", error="stdin closed")
        return 4
    except Exception as err:  # reported to the Rust side, which shows stderr too
        traceback.print_exc()
        emit(event="error", error=f"{type(err).__name__}: {err}")
        return 1
    return 0


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--impl", choices=["fast", "django"], default="fast")
    parser.add_argument("--kind", choices=["queue", "pubsub"], default="queue")
    parser.add_argument("--url", action="append", default=[], help="a Redis host; repeat for shards")
    parser.add_argument("--prefix", default="asgi")
    parser.add_argument("--expiry", type=int, default=60)
    parser.add_argument("--group-expiry", type=int, default=86400)
    parser.add_argument("--capacity", type=int, default=100)
    parser.add_argument("--timeout", type=float, default=20.0, help="bound on the whole run, in seconds")
    commands = parser.add_subparsers(dest="command", required=True)

    listen = commands.add_parser("listen")
    listen.add_argument("--group", action="append", default=[])
    listen.add_argument("--channels", type=int, default=1, help="how many new_channel()s")
    listen.add_argument("--channel", help="receive on this name instead of new_channel()")
    listen.add_argument("--count", type=int, default=1, help="stop after this many messages")

    send = commands.add_parser("send")
    send.add_argument("channel")
    send.add_argument("message", help="a JSON object")

    group_send = commands.add_parser("group_send")
    group_send.add_argument("group")
    group_send.add_argument("message", help="a JSON object")

    hashing = commands.add_parser("hash")
    hashing.add_argument("names", nargs="+")
    hashing.add_argument("--ring-sizes", default="2,3,4,5")

    args = parser.parse_args(argv)
    if not args.url and args.command != "hash":
        parser.error("--url is required")
    return args


if __name__ == "__main__":
    sys.exit(asyncio.run(main(parse_args(sys.argv[1:]))))
