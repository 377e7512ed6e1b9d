"""Local HTTP server for http_client_leak.py.

Usage: http_server.py  -- listens on 127.0.0.1:0, prints `port <N>` once
listening, serves until killed.

Answers every GET with a short HTTP/1.1 response with Content-Length and no
"Connection: close", then closes the connection from its side (as a server
does on its idle timeout): a client that keeps the connection object without
closing it leaves its socket in CLOSE_WAIT.
"""

import http.server
import sys


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        body = b"hello\n"
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        self.wfile.flush()
        # Close our side; the client was not told.
        self.close_connection = True

    def log_message(self, *args):
        pass


server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
server.daemon_threads = True
sys.stdout.write(f"port {server.server_address[1]}\n")
sys.stdout.flush()
server.serve_forever()
