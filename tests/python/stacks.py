"""Blocks in known functions at known lines, for the Python frame tests.

The main thread blocks reading a pipe nobody writes, deep in a chain of
calls through a class, a closure, a generator and a function whose name is
not ASCII; a second thread blocks in the standard library (queue.Queue.get);
a third runs an asyncio event loop whose coroutine blocks in the same read.
Each line the tests expect in a stack carries a marker comment `# @name`.
Prints one JSON line, {"pid": ..., "worker": ..., "aio": ...} (the
threads' native ids),
then blocks until killed. On SIGUSR1, CPython's own faulthandler writes
every thread's stack to the file named by the first argument: the tests'
oracle of frames and lines, from the interpreter itself.
"""

import asyncio
import faulthandler
import json
import os
import queue
import signal
import sys
import threading


def inner(r):
    return os.read(r, 1)  # @inner


def gen(r):
    yield inner(r)  # @gen


class Outer:
    def method(self, r):
        def nested():
            return next(gen(r))  # @nested

        return nested()  # @method


def naïve_функция(r):
    return Outer().method(r)  # @naive


def worker(q):
    q.get()  # @worker


async def fetch_async(r):
    return inner(r)  # @async


def loop_thread(r):
    asyncio.run(fetch_async(r))  # @loop


dump = open(sys.argv[1], "w")
faulthandler.register(signal.SIGUSR1, file=dump, all_threads=True)
q = queue.Queue()
t = threading.Thread(target=worker, args=(q,), name="worker", daemon=True)
t.start()
r, w = os.pipe()
aio = threading.Thread(target=loop_thread, args=(r,), name="aio", daemon=True)
aio.start()
print(json.dumps({"pid": os.getpid(), "worker": t.native_id, "aio": aio.native_id}), flush=True)
naïve_функция(r)  # @module
