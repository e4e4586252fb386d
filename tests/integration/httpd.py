#!/usr/bin/env python3
"""Test HTTP server for clawlua's http tests (python3 standard library only).

Listens on 127.0.0.1 (an ephemeral port, printed as the first stdout line) or on a Unix socket
(--unix PATH). Endpoints:
  GET  /json            a small JSON document
  POST /echo            echoes method, headers and body as JSON
  GET  /bytes?n=N       N bytes of 'x'
  GET  /slow?ms=M       answers after M milliseconds
  GET  /hang            accepts and never answers
  GET  /sse?n=N&ms=M    N server-sent events, M ms apart, chunked
  GET  /status/CODE     an empty response with that status
  GET  /redirect        302 to /json
"""
import json
import os
import socketserver
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def send(self, code, body=b"", ctype="application/json", extra=None):
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Test", "one")
        self.send_header("X-Test", "two")
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def route(self):
        u = urlparse(self.path)
        q = {k: v[0] for k, v in parse_qs(u.query).items()}
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        if u.path == "/json":
            return self.send(200, json.dumps({"ok": True, "items": [1, 2, 3]}).encode())
        if u.path == "/echo":
            doc = {"method": self.command, "path": self.path,
                   "headers": {k.lower(): v for k, v in self.headers.items()},
                   "body": body.decode("utf-8", "replace")}
            return self.send(200, json.dumps(doc).encode())
        if u.path == "/bytes":
            return self.send(200, b"x" * int(q.get("n", "0")), "application/octet-stream")
        if u.path == "/slow":
            time.sleep(int(q.get("ms", "100")) / 1000)
            return self.send(200, b'{"slow":true}')
        if u.path == "/hang":
            time.sleep(3600)
            return None
        if u.path == "/sse":
            n, ms = int(q.get("n", "3")), int(q.get("ms", "10"))
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for i in range(n):
                data = f"event: tick\ndata: {i}\n\n".encode()
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                self.wfile.flush()
                time.sleep(ms / 1000)
            self.wfile.write(b"0\r\n\r\n")
            return None
        if u.path.startswith("/status/"):
            return self.send(int(u.path.split("/")[2]))
        if u.path == "/redirect":
            return self.send(302, b"", extra={"Location": "/json"})
        return self.send(404, b'{"error":"not found"}')

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = route


class Quiet:
    """Clients that hang up early (timeouts, cancellations) are part of the tests."""
    daemon_threads = True
    request_queue_size = 256

    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            super().handle_error(request, client_address)


class TCPServer(Quiet, ThreadingHTTPServer):
    pass


class UnixServer(Quiet, socketserver.ThreadingMixIn, socketserver.UnixStreamServer):

    def get_request(self):
        conn, _ = self.socket.accept()
        return conn, ("unix", 0)


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "--unix":
        path = sys.argv[2]
        if os.path.exists(path):
            os.unlink(path)
        srv = UnixServer(path, Handler)
        print("unix", flush=True)
    else:
        srv = TCPServer(("127.0.0.1", 0), Handler)
        print(srv.server_address[1], flush=True)
    srv.serve_forever()


if __name__ == "__main__":
    main()
