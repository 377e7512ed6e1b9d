"""A small HTTP/1.1 keep-alive server on 127.0.0.1 for agent.py.

Answers every request with a small JSON body and keeps the connection open
for the next request, as production API servers do; closes a connection
idle for --idle seconds (nginx's keepalive_timeout), which leaves a client
that never closes its end with a socket in CLOSE_WAIT. Prints
`ready <port>` once listening and stops by itself after --seconds, or when
its parent (the agent) is gone.

  python3 keepalive_server.py [--port 0] [--idle 5] [--seconds 600]
"""

import argparse
import asyncio
import json
import os

BODY = json.dumps({"data": [1, 2, 3]}).encode()
RESPONSE = (
    b"HTTP/1.1 200 OK\r\n"
    b"Content-Type: application/json\r\n"
    b"Content-Length: %d\r\n"
    b"\r\n" % len(BODY)
) + BODY


async def serve_one(reader, writer, idle):
    try:
        while True:
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), idle)
            except (asyncio.TimeoutError, asyncio.IncompleteReadError):
                return
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value.strip() or 0)
            if length:
                await reader.readexactly(length)
            writer.write(RESPONSE)
            await writer.drain()
            if b"connection: close" in head.lower():
                return
    except (ConnectionError, asyncio.IncompleteReadError):
        pass
    finally:
        writer.close()


async def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--idle", type=float, default=5.0)
    ap.add_argument("--seconds", type=float, default=600.0)
    args = ap.parse_args()
    parent = os.getppid()
    server = await asyncio.start_server(
        lambda r, w: serve_one(r, w, args.idle), "127.0.0.1", args.port
    )
    port = server.sockets[0].getsockname()[1]
    print(f"ready {port}", flush=True)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + args.seconds
    async with server:
        while loop.time() < deadline and os.getppid() == parent:
            await asyncio.sleep(0.5)


if __name__ == "__main__":
    asyncio.run(main())
