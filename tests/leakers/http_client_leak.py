"""Leaks one TCP connection per request to a local HTTP server.

Usage: http_client_leak.py RATE PORT

Each request: http.client.HTTPConnection to 127.0.0.1:PORT, GET /, read the
whole response; the connection is then kept in a list and never closed. The
server (http_server.py) answers HTTP/1.1 without "Connection: close" and then
closes its side, so http.client keeps the socket (it believes the connection
may be reused) and the kernel puts it in CLOSE_WAIT: the classic leaked
client connection. One fd per request.
"""

import http.client
import sys

import leakcommon

leakcommon.set_nofile()
rate = leakcommon.rate_arg(sys.argv[1])
port = int(sys.argv[2])
kept = []


def leak():
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", "/")
    resp = conn.getresponse()
    resp.read()
    kept.append((conn, resp))


leakcommon.ready()
leakcommon.paced(rate, leak)
