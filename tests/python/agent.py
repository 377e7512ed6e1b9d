"""The field report's agent: an httpx.AsyncClient() per request, never closed.

fetch_data_wrong() makes a new AsyncClient for every request and never
closes it, so every request leaves a connected socket behind (in
CLOSE_WAIT once the server drops the idle connection); fetch_data_right()
shares one client and is healthy. Against keepalive_server.py, started as
a child unless --url is given. Bounded: --requests requests at --rate per
second, then it exits, or with --hold prints `done <pid> <requests>` and
holds its fds (the leaked clients) that many seconds more, or until its
parent is gone.

  py=$(tests/python/venv.sh python3)      # a venv with httpx
  sudo fdtrace run -- "$py" tests/python/agent.py

Prints `ready <pid>` before the first request. With --start-file, the
requests begin once that file exists: a test that runs the agent under
fdtrace creates it once fdtrace has found the agent's interpreter, so that
every request is made with Python stacks on (the fds a process makes right
after exec, before that, have native stacks only).
"""

import argparse
import asyncio
import os
import subprocess
import sys
import time

import httpx


# Every client fetch_data_wrong made. The service of the field report kept
# its clients reachable (in per-request state that outlived the request);
# a client nothing refers to is closed by CPython's garbage collector
# sooner or later, which hides the leak in a short test.
clients = []


async def fetch_data_wrong(url):
    client = httpx.AsyncClient()
    clients.append(client)
    response = await client.get(url)  # @leak: the client is never closed
    return response.json()


async def fetch_data_right(client, url):
    response = await client.get(url)  # @healthy: one shared client
    return response.json()


# How long --start-file may take to appear.
START_TIMEOUT = 60.0


async def wait_for_file(path, timeout):
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            sys.exit(f"agent: {path} did not appear within {timeout:.0f} s")
        await asyncio.sleep(0.02)


def start_server():
    here = os.path.dirname(os.path.abspath(__file__))
    server = subprocess.Popen(
        [sys.executable, os.path.join(here, "keepalive_server.py")],
        stdout=subprocess.PIPE,
        text=True,
    )
    line = server.stdout.readline().split()
    if line[:1] != ["ready"]:
        sys.exit(f"agent: keepalive_server.py said {line!r}, not 'ready PORT'")
    return server, f"http://127.0.0.1:{line[1]}/data"


async def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", help="default: start keepalive_server.py")
    ap.add_argument("--requests", type=int, default=150)
    ap.add_argument("--rate", type=float, default=5.0, help="requests per second")
    ap.add_argument("--hold", type=float, help="seconds to keep the fds after the requests")
    ap.add_argument("--start-file", help="wait until this file exists before the first request")
    args = ap.parse_args()
    server = None
    url = args.url
    if url is None:
        server, url = start_server()
    print(f"ready {os.getpid()}", flush=True)
    if args.start_file is not None:
        await wait_for_file(args.start_file, START_TIMEOUT)
    async with httpx.AsyncClient() as shared:
        start = time.monotonic()
        for k in range(args.requests):
            # Paced on the clock: the k-th request at start + k/rate.
            delay = start + k / args.rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            await fetch_data_wrong(url)
            await fetch_data_right(shared, url)
        if args.hold is not None:
            print(f"done {os.getpid()} {args.requests}", flush=True)
            parent = os.getppid()
            deadline = time.monotonic() + args.hold
            while time.monotonic() < deadline and os.getppid() == parent:
                await asyncio.sleep(0.2)
    if server is not None:
        server.terminate()
        server.wait()


if __name__ == "__main__":
    asyncio.run(main())
