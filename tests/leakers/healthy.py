"""A program with busy but bounded fd use: no leak.

Usage: healthy.py [RATE]   (RATE: churn iterations per second, default 200)

At start it opens a few long-lived fds (two files, a listening TCP socket, a
pipe) and a pool of 20 files. Then, RATE times per second: opens and closes
a file, creates and closes a UDP socket and a TCP socket; and every 10th
iteration replaces the oldest file of the pool by a new one (so pool fds live
about 1 s at the default rate). Its fd count stays constant (but for the few
microseconds an iteration holds one more fd).
"""

import collections
import os
import socket
import sys

import leakcommon

leakcommon.set_nofile()
rate = leakcommon.rate_arg(sys.argv[1]) if len(sys.argv) > 1 else 200.0

long_lived = [
    open("/dev/null", "rb"),
    open("/etc/hostname", "rb"),
    socket.create_server(("127.0.0.1", 0)),
]
long_lived.extend(os.pipe())
pool = collections.deque(open("/dev/null", "rb") for _ in range(20))
n = 0


def churn():
    global n
    n += 1
    with open("/etc/hostname", "rb") as f:
        f.read()
    socket.socket(socket.AF_INET, socket.SOCK_DGRAM).close()
    socket.socket(socket.AF_INET, socket.SOCK_STREAM).close()
    if n % 10 == 0:
        pool.append(open("/dev/null", "rb"))
        pool.popleft().close()


leakcommon.ready()
leakcommon.paced(rate, churn)
