"""A real GCS JSON API server on loopback for tests and benchmarks: the gcp-storage-emulator
package run in this process (in memory, on a free 127.0.0.1 port), optionally behind FaultProxy,
a small threaded HTTP proxy that can fail, drop or slow down requests on demand.

Point the google-cloud-storage client at it with STORAGE_EMULATOR_HOST=<FakeGCS.host>; the
client then uses anonymous credentials and never leaves 127.0.0.1.
"""

import http.client
import http.server
import json
import logging
import socket
import struct
import threading
import time
import urllib.parse
from typing import List, Optional, Tuple

from gcp_storage_emulator.server import create_server

LOOPBACK = "127.0.0.1"

# Headers that describe one hop, not the message: the proxy sets its own.
_HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "content-length",
    "server",
    "date",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


class _ProxyHandler(http.server.BaseHTTPRequestHandler):
    # HTTP/1.1 so the client keeps its connections open, as it does with real GCS.
    protocol_version = "HTTP/1.1"
    # Headers and body go out in two writes; with Nagle's algorithm on, the second waits for the
    # client's delayed ACK (40 ms) on a kept-alive connection, adding latency no bucket has.
    disable_nagle_algorithm = True

    def log_message(self, *args) -> None:  # keep test output quiet
        pass

    def do_GET(self):
        self._handle()

    do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_GET

    def _handle(self) -> None:
        proxy: FaultProxy = self.server.proxy
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        fault = proxy._begin(self.command, self.path)
        try:
            if proxy.latency_s:
                time.sleep(proxy.latency_s)
            if fault is None:
                self._forward(proxy, body)
            elif fault[0] == "status":
                self._answer(
                    fault[1],
                    json.dumps(
                        {"error": {"code": fault[1], "message": "injected by FaultProxy"}}
                    ).encode(),
                )
            elif fault[0] == "drop":  # close without answering: "Connection aborted"
                self.close_connection = True
            elif fault[0] == "reset":  # abortive close: the client gets a TCP RST
                self.connection.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                )
                self.close_connection = True
            elif fault[0] == "truncate":  # promise a body, send half of it, close
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", "100")
                self.end_headers()
                self.wfile.write(b"x" * 50)
                self.close_connection = True
        finally:
            proxy._end()

    def _forward(self, proxy: "FaultProxy", body: Optional[bytes]) -> None:
        upstream = http.client.HTTPConnection(LOOPBACK, proxy.upstream_port, timeout=30)
        try:
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
            upstream.request(self.command, self.path, body=body, headers=headers)
            response = upstream.getresponse()
            data = response.read()
            kept = [(k, v) for k, v in response.getheaders() if k.lower() not in _HOP_BY_HOP]
            self._answer(response.status, data, kept)
        finally:
            upstream.close()

    def _answer(
        self, status: int, data: bytes, headers: Optional[List[Tuple[str, str]]] = None
    ) -> None:
        self.send_response(status)
        for k, v in headers if headers is not None else [("Content-Type", "application/json")]:
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)


class FaultProxy:
    """Forwards every request to the emulator, except the ones it was told to spoil:
    fail_next(n, status) answers the next n requests with that status, drop_next(n) closes the
    connection without an answer, reset_next(n) resets it, truncate_next(n) cuts a body short,
    fail_for(seconds, status, path_contains) fails matching requests for a while.
    `latency_s` delays every request (models a real bucket's round trip; benchmarks only). It
    records each request (method, path) and the most requests it ever had in flight at once."""

    def __init__(self, upstream_port: int, latency_s: float = 0.0):
        self.upstream_port, self.latency_s = upstream_port, latency_s
        self.clock = time  # what fail_for's episodes are timed by (a test may share its clock)
        self.requests: List[Tuple[str, str]] = []
        self.max_in_flight = 0
        self._faults: List[Tuple] = []
        self._episodes: List[Tuple[float, int, str]] = []
        self._in_flight = 0
        self._lock = threading.Lock()
        self._server = http.server.ThreadingHTTPServer((LOOPBACK, 0), _ProxyHandler)
        self._server.daemon_threads = True
        self._server.proxy = self
        self.port = self._server.server_address[1]
        # A short poll interval so stop() returns quickly.
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.05,), daemon=True
        )

    def start(self) -> "FaultProxy":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _queue(self, count: int, fault: Tuple) -> None:
        with self._lock:
            self._faults.extend([fault] * count)

    def fail_next(self, count: int, status: int = 503) -> None:
        self._queue(count, ("status", status))

    def drop_next(self, count: int) -> None:
        self._queue(count, ("drop",))

    def reset_next(self, count: int) -> None:
        self._queue(count, ("reset",))

    def truncate_next(self, count: int) -> None:
        self._queue(count, ("truncate",))

    def fail_for(self, seconds: float, status: int = 503, path_contains: str = "") -> None:
        """Answer `status` to every request whose path holds `path_contains`, for `seconds`
        from now (a throttling episode, or an object that stays unreadable)."""
        with self._lock:
            self._episodes.append((self.clock.monotonic() + seconds, status, path_contains))

    def clear(self) -> None:
        """Forget recorded requests, queued faults, episodes and the in-flight maximum."""
        with self._lock:
            self.requests, self._faults, self.max_in_flight = [], [], 0
            self._episodes = []

    def _begin(self, method: str, path: str) -> Optional[Tuple]:
        with self._lock:
            self.requests.append((method, path))
            self._in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self._in_flight)
            now = self.clock.monotonic()
            for until, status, part in self._episodes:
                if now < until and part in urllib.parse.unquote(path):
                    return ("status", status)
            return self._faults.pop(0) if self._faults else None

    def _end(self) -> None:
        with self._lock:
            self._in_flight -= 1


class FakeGCS:
    """The emulator, in memory on a free loopback port, behind a FaultProxy. `host` is the
    value for STORAGE_EMULATOR_HOST (the proxy's address)."""

    def __init__(self, latency_s: float = 0.0):
        # The emulator logs every 404 and a warning per response at WARNING/ERROR level.
        logging.getLogger("gcp_storage_emulator").setLevel(logging.CRITICAL)
        self.emulator_port = free_port()
        self.emulator = create_server(LOOPBACK, self.emulator_port, in_memory=True)
        self.proxy = FaultProxy(self.emulator_port, latency_s)
        self.host = f"http://{LOOPBACK}:{self.proxy.port}"

    def start(self) -> "FakeGCS":
        self.emulator.start()
        self.proxy.start()
        return self

    def stop(self) -> None:
        self.proxy.stop()
        self.emulator.stop()

    def __enter__(self) -> "FakeGCS":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def client(self):
        """A client for setting up data, talking to the emulator directly (not through the proxy,
        so set-up requests are neither counted nor spoiled)."""
        return emulator_client(self.emulator_port)


def emulator_client(port: int):
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    return storage.Client(
        project="test",
        credentials=AnonymousCredentials(),
        client_options={"api_endpoint": f"http://{LOOPBACK}:{port}"},
    )


def _serve_in_child(latency_s: float, conn) -> None:
    with FakeGCS(latency_s) as gcs:
        conn.send((gcs.host, gcs.emulator_port))
        try:
            while conn.recv() == "count":  # until the parent says stop (or goes away)
                conn.send(len(gcs.proxy.requests))
        except EOFError:
            pass


class FakeGCSProcess:
    """FakeGCS in a child process, so that server work does not compete with the client for
    this process's GIL (for benchmarks; tests use FakeGCS, whose proxy they can steer)."""

    def __init__(self, latency_s: float = 0.0):
        import multiprocessing

        context = multiprocessing.get_context("spawn")
        self._conn, child_conn = context.Pipe()
        self._process = context.Process(
            target=_serve_in_child, args=(latency_s, child_conn), daemon=True
        )

    def __enter__(self) -> "FakeGCSProcess":
        self._process.start()
        self.host, self.emulator_port = self._conn.recv()
        return self

    def __exit__(self, *exc) -> None:
        self._conn.send("stop")
        self._process.join(10)

    def request_count(self) -> int:
        """Requests the proxy has seen so far (the set-up client's bypass it)."""
        self._conn.send("count")
        return self._conn.recv()

    def client(self):
        return emulator_client(self.emulator_port)
