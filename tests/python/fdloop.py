"""A tight syscall loop under CPython, seven frames deep, for `cargo xtask
bench` (the Python call sites' cost; tests/src/bin/fdloop.rs is the C one).

  python3 fdloop.py MODE ITERATIONS [--wait]

MODE is one of
- `open`: os.open("/dev/null") + os.close: a new fd, so a Python stack per
  iteration under fdtrace;
- `send`: one byte sent with sendto on one UDP socket to 127.0.0.1:9 (the
  discard port; nothing needs to listen): after the first, each send is
  the first-use check of an fd already used.

Prints one line on stdout, as fdloop.rs does: `fdloop MODE
ns_per_iter=<float> iters=<n> utime_us=<n> stime_us=<n>`. With --wait, it
first reads one byte of stdin, so that a tracer can attach before the
timed loop.
"""

import os
import resource
import socket
import sys
import time


def loop(mode, n):
    if mode == "open":
        for _ in range(n):
            os.close(os.open("/dev/null", os.O_RDONLY))
    else:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        for _ in range(n):
            s.sendto(b"x", ("127.0.0.1", 9))
        s.close()


# Frames 2-6: the stack a Python stack of seven frames walks
# (<module>, main, a, b, c, d, loop).
def d(mode, n):
    loop(mode, n)


def c(mode, n):
    d(mode, n)


def b(mode, n):
    c(mode, n)


def a(mode, n):
    b(mode, n)


def main():
    if len(sys.argv) < 3 or sys.argv[1] not in ("open", "send"):
        sys.exit("usage: fdloop.py open|send ITERATIONS [--wait]")
    mode, n = sys.argv[1], int(sys.argv[2])
    if "--wait" in sys.argv[3:]:
        sys.stdin.buffer.read(1)
    start = time.monotonic_ns()
    a(mode, n)
    ns = (time.monotonic_ns() - start) / n
    ru = resource.getrusage(resource.RUSAGE_SELF)
    print(
        f"fdloop {mode} ns_per_iter={ns:.2f} iters={n} "
        f"utime_us={int(ru.ru_utime * 1e6)} stime_us={int(ru.ru_stime * 1e6)}",
        flush=True,
    )


main()
