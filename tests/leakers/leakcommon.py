"""Shared by the leaker programs of the fdtrace leak tests (tests/tests/leaks.rs).

Every leaker:
- sets its own RLIMIT_NOFILE soft limit to 1024 (the hard limit is kept),
- prints `ready <pid>` on stdout (one line, flushed) once started,
- then calls its leak function at a constant rate, paced on the monotonic
  clock: the k-th call is due at t0 + k/rate, so a late call (a slow syscall,
  a busy machine) is made up for by the next ones and the long-run rate is
  exactly `rate`, whatever the sleep drift,
- runs until killed, or until orphaned (its parent is gone: a test that died
  leaves no leaker behind).

A call that fails with EMFILE/ENFILE (the leak reached the limit) is reported
once on stderr and the pace goes on: the process keeps failing like a real
leaking server would, and stays alive until killed.
"""

import errno
import os
import resource
import sys
import time

SOFT_NOFILE = 1024

# The parent when the program started (read as early as possible: the pace
# loop exits once it changes, i.e. the parent died and the leaker was
# reparented; a leaker that starts orphaned does not run at all).
PARENT = os.getppid()
if PARENT == 1:
    sys.exit(0)


def set_nofile(soft=SOFT_NOFILE):
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < soft:
        soft = hard
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def ready():
    sys.stdout.write(f"ready {os.getpid()}\n")
    sys.stdout.flush()


def rate_arg(s):
    r = float(s)
    if not r > 0:
        raise SystemExit(f"rate must be > 0, got {s!r}")
    return r


def paced(rate, fn):
    """Calls fn() at `rate` calls per second until killed."""
    t0 = time.monotonic()
    k = 0
    reported = False
    while True:
        due = t0 + k / rate
        delay = due - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        if os.getppid() != PARENT:
            sys.exit(0)
        k += 1
        try:
            fn()
        except OSError as e:
            if e.errno not in (errno.EMFILE, errno.ENFILE):
                raise
            if not reported:
                reported = True
                sys.stderr.write(f"{os.path.basename(sys.argv[0])}: {e} after {k} calls\n")
                sys.stderr.flush()
