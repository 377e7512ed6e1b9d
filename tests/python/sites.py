"""Leaks fds from named functions, the way Python services do, for the call
site tests (tests/tests/python_sites.rs).

  sites.py --label NAME --dir DIR --url http://127.0.0.1:PORT/data
           [--agent] [--agent-requests 8] [--rate 2] [--seconds 8]
           [--hold 30]

Every tick (--rate per second, paced on the monotonic clock) for --seconds,
from one loop, each of these functions leaks one fd that it keeps
reachable (a leaked object nothing refers to is closed by the garbage
collector sooner or later, which would hide the leak):
- report_a() and report_b(): open() of the same file (two sites, one
  resource);
- db_connect(): sqlite3.connect();
- log_handler(): logging.FileHandler();
- run_child(): subprocess.Popen(stdout=PIPE), the pipe never read or closed;
- http_get(): a GET through http.client.HTTPConnection, never closed;
- open_stream(): asyncio.open_connection(), the writer never closed;
- deep(): open() at the end of a recursion DEEP calls deep, of frames
  large enough that the 32 innermost span more than the window of the
  data stack fdtrace reads in one go: from the main thread into
  DIR/deep.log (on the way, its stack takes a new chunk of the data
  stack), and from a thread of its own into DIR/deep_thread.log (a fresh
  data stack: all in its first chunk);
and healthy() opens and closes a file and a socket: no leak.

A thread blocks in open() of the FIFO DIR/peer.fifo (in open_peer), until
someone opens it for writing: the tests read its stack with py-spy while it
waits, and fdtrace's stack of that fd must be the same.

With --agent, agent.py runs as a child against --url (its
fetch_data_wrong leaks a socket per request through httpx):
--agent-requests requests over --seconds, then it holds its fds for --hold
seconds; its output goes to DIR/agent.out. Its requests begin once
DIR/agent.go exists (the test creates it once fdtrace has found the
agent's interpreter).

Each line the tests expect in a stack carries a marker comment `# @name`.
Writes JSON lines to DIR/events (not to stdout, which a tracer running it
may share), each with the --label: "ready" once started (pid,
fifo_tid: the FIFO thread's native id, agent: its pid or null, python: the
version), "idle" once the leaking is over (calls: the ticks done, each of
which leaked one fd per function above). Then it holds its fds for --hold
seconds, or until its parent is gone, and exits.
"""

import argparse
import asyncio
import http.client
import json
import logging
import os
import platform
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from urllib.parse import urlsplit

# Every leaked object.
kept = []


def report_a(path):
    kept.append(open(path, "a"))  # @report_a


def report_b(path):
    kept.append(open(path, "a"))  # @report_b


def db_connect(path):
    kept.append(sqlite3.connect(path))  # @db_connect


def log_handler(path):
    kept.append(logging.FileHandler(path))  # @log_handler


def run_child():
    kept.append(subprocess.Popen(["true"], stdout=subprocess.PIPE))  # @run_child


def http_get(host, port):
    conn = http.client.HTTPConnection(host, port, timeout=10)
    conn.request("GET", "/data")  # @http_get
    conn.getresponse().read()
    kept.append(conn)


async def open_stream(host, port):
    reader, writer = await asyncio.open_connection(host, port)  # @open_stream
    kept.append(writer)


# Deeper than the 32 frames fdtrace keeps.
DEEP = 40


def deep(n, path):
    # 32 locals: a frame of about 330 bytes on the data stack.
    a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = a8 = a9 = n
    b0 = b1 = b2 = b3 = b4 = b5 = b6 = b7 = b8 = b9 = n
    c0 = c1 = c2 = c3 = c4 = c5 = c6 = c7 = c8 = c9 = n
    if n:
        return deep(n - 1, path)  # @deep
    kept.append(open(path, "a"))  # @deep_leak
    return a0 + a9 + b0 + b9 + c0 + c9


def healthy(path):
    with open(path) as f:  # @healthy
        f.read()
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)  # @healthy_socket
    s.close()


def open_peer(path):
    kept.append(open(path, "rb"))  # @open_peer


def wait_for_peer(path):
    open_peer(path)  # @wait_for_peer


def say(args, **fields):
    with open(os.path.join(args.dir, "events"), "a") as f:
        f.write(json.dumps(dict(label=args.label, **fields)) + "\n")


def tick(d, host, port):
    report_a(os.path.join(d, "report.log"))  # @tick_a
    report_b(os.path.join(d, "report.log"))  # @tick_b
    db_connect(os.path.join(d, "state.db"))
    log_handler(os.path.join(d, "app.log"))
    run_child()
    http_get(host, port)
    deep(DEEP, os.path.join(d, "deep.log"))
    t = threading.Thread(target=deep, args=(DEEP, os.path.join(d, "deep_thread.log")))
    t.start()
    t.join()
    healthy(__file__)


async def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--label", required=True)
    ap.add_argument("--dir", required=True)
    ap.add_argument("--url", required=True)
    ap.add_argument("--agent", action="store_true")
    ap.add_argument("--agent-requests", type=int, default=8)
    ap.add_argument("--rate", type=float, default=2.0)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--hold", type=float, default=30.0)
    args = ap.parse_args()
    url = urlsplit(args.url)
    host, port = url.hostname, url.port
    parent = os.getppid()

    fifo = os.path.join(args.dir, "peer.fifo")
    os.mkfifo(fifo)
    peer = threading.Thread(target=wait_for_peer, args=(fifo,), daemon=True)
    peer.start()
    calls = int(args.seconds * args.rate)
    agent = None
    if args.agent:
        here = os.path.dirname(os.path.abspath(__file__))
        with open(os.path.join(args.dir, "agent.out"), "w") as out:
            agent = subprocess.Popen(
                [
                    sys.executable,
                    os.path.join(here, "agent.py"),
                    "--url",
                    args.url,
                    "--requests",
                    str(args.agent_requests),
                    "--rate",
                    str(args.agent_requests / args.seconds),
                    "--hold",
                    str(args.hold),
                    "--start-file",
                    os.path.join(args.dir, "agent.go"),
                ],
                stdout=out,
            )
    say(
        args,
        event="ready",
        pid=os.getpid(),
        fifo_tid=peer.native_id,
        agent=agent.pid if agent else None,
        python=platform.python_version(),
    )
    start = time.monotonic()
    for k in range(calls):
        delay = start + k / args.rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        tick(args.dir, host, port)
        await open_stream(host, port)  # @tick_stream
    say(args, event="idle", pid=os.getpid(), calls=calls)
    deadline = time.monotonic() + args.hold
    while time.monotonic() < deadline and os.getppid() == parent:
        await asyncio.sleep(0.2)
    if agent is not None:
        agent.kill()
        agent.wait()


if __name__ == "__main__":
    asyncio.run(main())
