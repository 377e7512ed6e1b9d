"""Leaks one sqlite3 connection (one fd on DIR/db.sqlite) per call.

Usage: sqlite_leak.py RATE DIR

Each call: sqlite3.connect(DIR/db.sqlite), run a query that reads the schema
(so the database file is really opened and read), keep the connection in a
list, never close it. The database is created (one table) before `ready`.
Rollback-journal mode: no -wal/-shm files stay open.
"""

import os
import sqlite3
import sys

import leakcommon

leakcommon.set_nofile()
rate = leakcommon.rate_arg(sys.argv[1])
path = os.path.join(sys.argv[2], "db.sqlite")

init = sqlite3.connect(path)
init.execute("CREATE TABLE IF NOT EXISTS t (x INTEGER)")
init.commit()
init.close()

kept = []


def leak():
    conn = sqlite3.connect(path)
    conn.execute("SELECT count(*) FROM sqlite_master").fetchall()
    kept.append(conn)


leakcommon.ready()
leakcommon.paced(rate, leak)
