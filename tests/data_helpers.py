"""Test helpers for the data tools: real photos as JPEG bytes and a local HTTP server that fails on
request (404, 5xx, hangs, slow and flaky answers, non-image bytes, truncated JPEGs, ...).

The server listens on 127.0.0.1 only, answers at most ``max_requests`` requests, never sleeps
longer than ``hang_s`` in a handler, and shuts itself down after ``lifetime_s`` even if a test
forgets to: it cannot outlive the test run or hang it.
"""

from __future__ import annotations

import io
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
from PIL import Image


def photo(size: tuple[int, int] = (320, 240), seed: int = 0) -> Image.Image:
    """A crop of a real photo (skimage's astronaut / coffee / chelsea), resized to ``size``."""
    import skimage.data

    src = [skimage.data.astronaut, skimage.data.coffee, skimage.data.chelsea][seed % 3]()
    img = Image.fromarray(src)
    w, h = img.size
    box = (seed * 7 % (w // 4), seed * 5 % (h // 4), w - seed * 3 % (w // 4), h - seed * 11 % (h // 4))
    return img.crop(box).resize(size, Image.Resampling.BICUBIC)


def encode(img: Image.Image, fmt: str = "JPEG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def jpeg(size: tuple[int, int] = (320, 240), seed: int = 0, quality: int = 90) -> bytes:
    return encode(photo(size, seed), "JPEG", quality=quality)


def noise_png(size: tuple[int, int] = (64, 48), seed: int = 0) -> bytes:
    rgb = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return encode(Image.fromarray(rgb), "PNG")


class FailingServer:
    """``with FailingServer() as srv: srv.url("ok/a.jpg")``; routes (first path segment):

    ok/<name>      200 with ``srv.images[name]`` (JPEG bytes)
    status/<code>  that HTTP status
    hang/<x>       sleeps ``hang_s`` before answering (longer than the client's timeout)
    slow/<name>    sleeps ``slow_s`` (shorter than the timeout), then serves the image
    trickle/<x>    sends a JPEG a few bytes at a time, slower than the timeout in total
    flaky/<name>   503 on the first request for the path, the image afterwards
    text/<x>       200 with an HTML page (not an image)
    trunc/<name>   200 with the first half of the JPEG (a complete response, a cut image)
    empty/<x>      200 with zero bytes
    """

    def __init__(
        self, hang_s: float = 3.0, slow_s: float = 0.2, max_requests: int = 500, lifetime_s: float = 120
    ):
        self.images: dict[str, bytes] = {}
        self.hits: Counter[str] = Counter()  # path (with its query) -> requests
        self.user_agents: set[str] = set()
        self.hang_s, self.slow_s, self.max_requests = hang_s, slow_s, max_requests
        self.lifetime_s = lifetime_s
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05})
        self._thread.daemon = True
        self._timer = threading.Timer(lifetime_s, self._server.shutdown)
        self._timer.daemon = True

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/{path}"

    def __enter__(self) -> FailingServer:  # noqa: PYI034 (py3.10: no typing.Self)
        self._thread.start()
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._timer.cancel()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        srv = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:  # keep test output clean
                pass

            def _send(self, code: int, body: bytes = b"", ctype: str = "image/jpeg") -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                with srv._lock:
                    srv.hits[self.path] += 1
                    n, total = srv.hits[self.path], sum(srv.hits.values())
                    srv.user_agents.add(self.headers.get("User-Agent", ""))
                if total > srv.max_requests:
                    return self._send(503, b"request budget of the test server used up", "text/plain")
                route, _, name = self.path.split("?")[0].lstrip("/").partition("/")  # ?query: a label
                image = srv.images.get(name, b"")
                try:
                    self._route(route, name, image, n)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout)
                    pass

            def _route(self, route: str, name: str, image: bytes, n: int) -> None:
                if route == "ok":
                    self._send(200, image)
                elif route == "status":
                    self._send(int(name), b"failure on request", "text/plain")
                elif route == "hang":
                    time.sleep(srv.hang_s)
                    self._send(200, image)
                elif route == "slow":
                    time.sleep(srv.slow_s)
                    self._send(200, image)
                elif route == "trickle":
                    self.send_response(200)
                    self.send_header("Content-Length", "4000")
                    self.end_headers()
                    deadline = time.monotonic() + srv.hang_s
                    while time.monotonic() < deadline:
                        self.wfile.write(b"\xff")
                        self.wfile.flush()
                        time.sleep(0.05)
                elif route == "flaky":
                    self._send(503, b"try again", "text/plain") if n == 1 else self._send(200, image)
                elif route == "text":
                    self._send(200, b"<html><body>not an image</body></html>", "text/html")
                elif route == "trunc":
                    self._send(200, image[: len(image) // 2])
                elif route == "empty":
                    self._send(200, b"")
                else:
                    self._send(404, b"no such route", "text/plain")

        return Handler
