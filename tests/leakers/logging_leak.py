"""Leaks one logging.FileHandler (one fd on DIR/app.log) per call.

Usage: logging_leak.py RATE DIR

Each call adds a new logging.FileHandler(DIR/app.log) to the same logger and
never removes it (the classic "handler added per request"); one record is
logged so the handlers are used. One fd per call.
"""

import logging
import os
import sys

import leakcommon

leakcommon.set_nofile()
rate = leakcommon.rate_arg(sys.argv[1])
path = os.path.join(sys.argv[2], "app.log")
log = logging.getLogger("leaky")
log.setLevel(logging.INFO)
log.propagate = False
n = 0


def leak():
    global n
    n += 1
    log.addHandler(logging.FileHandler(path))
    if n % 50 == 1:
        log.info("request %d", n)


leakcommon.ready()
leakcommon.paced(rate, leak)
