#!/usr/bin/env python3
"""A counting HTTP proxy on loopback in front of a local DynamoDB server (moto).

Every DynamoDB operation is one HTTP POST whose `X-Amz-Target` header names it
(`DynamoDB_20120810.PutItem`, ...). The proxy forwards each request unchanged to the
upstream server over a keep-alive connection and counts it by that header, at the server
side of both clients under test.

Two paths are answered by the proxy itself and never forwarded:

  GET /__counts   the counts so far, as JSON: {"PutItem": 12, "GetItem": 3, ...}
  GET /__times    the upstream's time so far, ns by operation (request sent to reply read)
  GET /__quit     stop the proxy (the driver script's clean exit)

Usage: count_proxy.py LISTEN_PORT UPSTREAM_PORT [MAX_SECONDS]

Both addresses are 127.0.0.1. The proxy exits by itself after MAX_SECONDS (default 900).
"""

import http.client
import http.server
import json
import socket
import sys
import threading
import time
from collections import Counter

COUNTS = Counter()
TIMES = Counter()
LOCK = threading.Lock()
# Headers the proxy must not copy hop to hop (it re-frames bodies by Content-Length).
HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "te", "upgrade"}


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    upstream_port = 8000
    # Headers and body leave in two writes: without TCP_NODELAY, Nagle's algorithm and the
    # client's delayed ACK hold the body back ~40 ms.
    disable_nagle_algorithm = True

    def log_message(self, fmt, *args):  # no per-request logging
        pass

    def _upstream(self):
        conn = getattr(self, "_conn", None)
        if conn is None:
            conn = http.client.HTTPConnection("127.0.0.1", self.upstream_port, timeout=30)
            conn.connect()
            conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._conn = conn
        return conn

    def _read_body(self):
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length", "0") or "0")
        return self.rfile.read(length) if length else b""

    def _reply(self, status, body, ctype="application/json"):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _forward(self):
        body = self._read_body()
        target = self.headers.get("X-Amz-Target")
        if target is not None:
            op = target.rsplit(".", 1)[-1]
        else:
            op = f"{self.command} (no X-Amz-Target)"
        with LOCK:
            COUNTS[op] += 1
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP}
        headers["Content-Length"] = str(len(body))
        for attempt in range(2):
            conn = self._upstream()
            try:
                start = time.perf_counter_ns()
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                with LOCK:
                    TIMES[op] += time.perf_counter_ns() - start
                break
            except (http.client.HTTPException, OSError):
                # A keep-alive connection the upstream closed: reconnect once.
                conn.close()
                self._conn = None
                if attempt == 1:
                    raise
        self.send_response(resp.status, resp.reason)
        for k, v in resp.getheaders():
            if k.lower() not in HOP and k.lower() != "content-length":
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self.path == "/__counts":
            with LOCK:
                body = json.dumps(dict(COUNTS), sort_keys=True).encode()
            self._reply(200, body)
            return
        if self.path == "/__times":
            with LOCK:
                body = json.dumps(dict(TIMES), sort_keys=True).encode()
            self._reply(200, body)
            return
        if self.path == "/__quit":
            self._reply(200, b"{}")
            threading.Thread(target=self.server.shutdown, daemon=True).start()
            return
        self._forward()

    def do_POST(self):
        self._forward()

    do_PUT = do_POST
    do_DELETE = do_POST
    do_HEAD = do_GET


def main():
    listen = int(sys.argv[1])
    Handler.upstream_port = int(sys.argv[2])
    max_seconds = float(sys.argv[3]) if len(sys.argv) > 3 else 900.0
    server = http.server.ThreadingHTTPServer(("127.0.0.1", listen), Handler)
    server.daemon_threads = True
    timer = threading.Timer(max_seconds, server.shutdown)
    timer.daemon = True
    timer.start()
    print(f"count_proxy: 127.0.0.1:{listen} -> 127.0.0.1:{Handler.upstream_port}", flush=True)
    server.serve_forever()
    timer.cancel()


if __name__ == "__main__":
    main()
