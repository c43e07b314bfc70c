"""A TCP proxy that adds a fixed delay each way: a distant server, on 127.0.0.1.

    python bench/delay_proxy.py --to 127.0.0.1:8080 --delay-ms 10 [--port 0]

Prints the port it listens on, then forwards every connection to ``--to``, holding each
chunk of bytes ``--delay-ms`` before passing it on, in order (a round trip gains twice
the delay). It models latency, not bandwidth: nothing is paced. The machine has no
``tc netem``; this is the stand-in the ``far`` suite of bench_download.py uses.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                delay: float) -> None:
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def deliver() -> None:
        while True:
            due, data = await queue.get()
            if not data:
                break
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            writer.write(data)
            await writer.drain()
        with contextlib.suppress(OSError):
            writer.write_eof()

    task = asyncio.create_task(deliver())
    try:
        while data := await reader.read(256 * 1024):
            queue.put_nowait((time.monotonic() + delay, data))
    except OSError:
        pass
    queue.put_nowait((time.monotonic() + delay, b""))
    with contextlib.suppress(OSError):
        await task


async def _serve(target: tuple[str, int], delay: float, port: int) -> None:
    # asyncio holds tasks weakly, and a stream protocol drops its handler's task when
    # the client's connection is lost: held here, a handler whose client went away
    # (aria2c closes pipelined connections abruptly) still closes its side to the
    # server, instead of being collected mid-wait ("Task was destroyed but it is
    # pending!") with that connection left open.
    live: set[asyncio.Task[None]] = set()

    async def handle(cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        me = asyncio.current_task()
        assert me is not None
        live.add(me)
        try:
            try:
                sr, sw = await asyncio.open_connection(*target)
            except OSError:
                cw.close()
                return
            await asyncio.gather(_pipe(cr, sw, delay), _pipe(sr, cw, delay),
                                 return_exceptions=True)
            for w in (cw, sw):
                w.close()
        finally:
            live.discard(me)

    server = await asyncio.start_server(handle, "127.0.0.1", port, backlog=1024)
    print(server.sockets[0].getsockname()[1], flush=True)
    async with server:
        await server.serve_forever()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--to", required=True, help="HOST:PORT to forward to")
    ap.add_argument("--delay-ms", type=float, required=True, help="one-way delay")
    ap.add_argument("--port", type=int, default=0, help="port to listen on (0: any)")
    args = ap.parse_args()
    host, _, port = args.to.rpartition(":")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve((host, int(port)), args.delay_ms / 1000, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
