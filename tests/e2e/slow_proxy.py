#!/usr/bin/env python3
"""A TCP proxy that slows the server-to-client direction of every
connection to RATE bytes per second: an upstream far enough away that a
blob fill lasts seconds, so a test can kill a node in the middle of one.

Usage: slow_proxy.py LISTEN_PORT TARGET_HOST:TARGET_PORT RATE_BYTES_PER_S
Prints "listening" once it accepts connections.
"""
import asyncio
import sys
import time

CHUNK = 64 * 1024


async def pipe(reader, writer, rate):
    try:
        start = time.monotonic()
        sent = 0
        while True:
            data = await reader.read(CHUNK)
            if not data:
                break
            writer.write(data)
            await writer.drain()
            sent += len(data)
            if rate:
                ahead = sent / rate - (time.monotonic() - start)
                if ahead > 0:
                    await asyncio.sleep(ahead)
    except (ConnectionError, asyncio.CancelledError):
        pass
    finally:
        try:
            writer.close()
        except Exception:
            pass


async def handle(client_r, client_w, host, port, rate):
    try:
        up_r, up_w = await asyncio.open_connection(host, port)
    except OSError:
        client_w.close()
        return
    await asyncio.gather(pipe(client_r, up_w, 0), pipe(up_r, client_w, rate))


async def main():
    listen = int(sys.argv[1])
    host, port = sys.argv[2].rsplit(":", 1)
    rate = int(sys.argv[3])
    server = await asyncio.start_server(
        lambda r, w: handle(r, w, host, int(port), rate), "127.0.0.1", listen)
    print("listening", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
