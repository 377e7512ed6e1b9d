"""Leaks the stdout pipe of one subprocess per call.

Usage: popen_leak.py RATE

Each call: subprocess.Popen(["true"], stdout=subprocess.PIPE); the child is
waited for (no zombies pile up) but the Popen object is kept with its stdout
pipe never read nor closed. One fd (a pipe's read end) per call.
"""

import subprocess
import sys

import leakcommon

leakcommon.set_nofile()
rate = leakcommon.rate_arg(sys.argv[1])
kept = []


def leak():
    p = subprocess.Popen(["true"], stdout=subprocess.PIPE)
    p.wait()
    kept.append(p)


leakcommon.ready()
leakcommon.paced(rate, leak)
