"""``clipkit index serve``: an HTTP JSON API over one index, plus a one-page search UI.

    GET  /                          the page: search box, image upload, result grid
    GET  /api/info                  index key, size, width, model, limits
    GET  /api/search?q=TEXT&k=K     text query (also POST /api/search {"q": TEXT, "k": K})
    POST /api/search/image?k=K      image query; the body is the image file's bytes
    GET  /api/neighbours?key=KEY&k=K  nearest other samples of an indexed sample
    GET  /api/metadata?key=KEY      one sample's metadata row (or ?id=N)
    GET  /api/image?id=N            the sample's image, read from its shard or file

Binds to 127.0.0.1 unless told otherwise. Every input is checked; a bad one gets a 4xx
``{"error": "..."}`` and the server goes on serving. Bodies over ``max_body`` bytes are
refused (413) after being read and discarded (up to a cap), so the client sees the answer;
``k`` must lie in [1, max_k]; at most ``max_busy`` requests run at once (503 beyond).
"""

from __future__ import annotations

import json
import mimetypes
import sys
import tarfile
import threading
import time
import traceback
from collections import OrderedDict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from clipkit.data.decode import SampleError, decode_image
from clipkit.data.tario import split_name
from clipkit.index.embed import embed_images, embed_texts
from clipkit.index.page import PAGE
from clipkit.index.search import SearchIndex, UnknownKeyError

DRAIN_CAP = 64 * 2**20  # an oversized body is read and dropped up to this, then the socket closes
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "gif", "bmp")
MAX_IMAGE_FILE = 32 * 2**20


class ApiError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class App:
    """The request-independent state: index, model, limits, an image locator."""

    def __init__(
        self,
        index: SearchIndex,
        model: Any,
        model_name: str,
        *,
        max_k: int = 100,
        max_body: int = 8 * 2**20,
        max_query_chars: int = 1000,
        max_busy: int = 16,
        max_pixels: int = 40_000_000,
    ):
        self.index, self.model, self.model_name = index, model, model_name
        self.max_k, self.max_body, self.max_query_chars = max_k, max_body, max_query_chars
        self.max_pixels = max_pixels
        self.busy = threading.BoundedSemaphore(max_busy)
        self.model_lock = threading.Lock()  # one forward pass at a time; FAISS runs concurrently
        index.check_model(embed_texts(model, ["probe"]).shape[1], model_name)
        self._tar_members: OrderedDict[str, dict[str, tuple[str, int, int]]] = OrderedDict()
        self._tar_lock = threading.Lock()

    # ------------------------------------------------------------------ validation

    def k_of(self, raw: Any) -> int:
        if raw is None:
            return min(10, self.max_k)
        try:
            k = int(raw) if not isinstance(raw, bool) else -1
        except (TypeError, ValueError):
            raise ApiError(400, f"k must be an integer, got {str(raw)[:40]!r}") from None
        if not 1 <= k <= self.max_k:
            raise ApiError(400, f"k must be between 1 and {self.max_k}, got {k}")
        return k

    def text_of(self, raw: Any) -> str:
        if not isinstance(raw, str):
            raise ApiError(400, "the query 'q' must be a string")
        text = raw.strip()
        if not text:
            raise ApiError(400, "empty query: type some text to search for")
        if len(text) > self.max_query_chars:
            raise ApiError(400, f"query is {len(text)} characters; the limit is {self.max_query_chars}")
        return text

    # ------------------------------------------------------------------ actions

    def search_text(self, text: str, k: int) -> list[dict]:
        with self.model_lock:
            vec = embed_texts(self.model, [text])
        return self.with_images(self.index.search(vec, k)[0])

    def search_image(self, data: bytes, k: int) -> list[dict]:
        if not data:
            raise ApiError(400, "empty upload: send the image file's bytes as the request body")
        try:
            image = decode_image(data, max_pixels=self.max_pixels)
        except SampleError as e:
            raise ApiError(400, f"the upload is not a usable image ({e})") from None
        with self.model_lock:
            vec = embed_images(self.model, [image])
        return self.with_images(self.index.search(vec, k)[0])

    def neighbours(self, key: str, k: int) -> list[dict]:
        return self.with_images(self.index.neighbours(key, k))

    def with_images(self, rows: list[dict]) -> list[dict]:
        """Add each row's ``image`` URL: served here (shard or local file), its web URL, or None."""
        for row in rows:
            src = row.get("source") or ""
            if str(row.get("shard", "")).endswith(".tar") or Path(src).is_file():
                row["image"] = f"/api/image?id={row['id']}"
            else:
                row["image"] = src if src.startswith(("http://", "https://")) else None
        return rows

    def image(self, id_: int) -> tuple[bytes, str]:
        row = self.index.rows([id_])[0]
        shard, src = str(row.get("shard") or ""), str(row.get("source") or "")
        if shard.endswith(".tar") and Path(shard).is_file():
            member = self._tar_member(shard, row["key"])
            if member is not None:
                name, offset, size = member
                with open(shard, "rb") as f:
                    f.seek(offset)
                    return f.read(size), mimetypes.guess_type(name)[0] or "application/octet-stream"
        elif src and Path(src).is_file() and Path(src).stat().st_size <= MAX_IMAGE_FILE:
            return Path(src).read_bytes(), mimetypes.guess_type(src)[0] or "application/octet-stream"
        raise ApiError(404, f"no local image for id {id_}")

    def _tar_member(self, shard: str, key: str) -> tuple[str, int, int] | None:
        """(member name, byte offset, size) of the sample's image in a local tar (shards cached)."""
        with self._tar_lock:
            members = self._tar_members.get(shard)
            if members is None:
                members = {}
                try:
                    with tarfile.open(shard, "r:") as tar:  # plain tars only: offsets index the file
                        for info in tar:
                            parts = split_name(info.name)
                            if info.isfile() and parts and parts[1] in IMAGE_EXTS and parts[0] not in members:
                                members[parts[0]] = (info.name, info.offset_data, info.size)
                except (tarfile.TarError, OSError):
                    pass  # compressed or damaged: its images are not served (404)
                self._tar_members[shard] = members
                while len(self._tar_members) > 8:
                    self._tar_members.popitem(last=False)
            return members.get(key)


class Handler(BaseHTTPRequestHandler):
    server_version = "clipkit-index"
    timeout = 30  # seconds of socket silence before a connection is dropped

    @property
    def app(self) -> App:
        return self.server.app  # type: ignore[attr-defined]

    def log_message(self, fmt: str, *args: Any) -> None:
        if getattr(self.server, "verbose", False):
            super().log_message(fmt, *args)

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def _dispatch(self, method: str) -> None:
        if not self.app.busy.acquire(blocking=False):
            self._drop_body()
            return self._json(503, {"error": "server busy; retry shortly"})
        try:
            url = urlsplit(self.path)
            params = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
            route = ROUTES.get(url.path)
            if route is None:
                raise ApiError(404, f"no such endpoint {url.path!r}; see GET /api/info")
            if method not in route:
                raise ApiError(405, f"{url.path} takes {' or '.join(route)}, not {method}")
            route[method](self, params)
        except ApiError as e:
            self._json(e.status, {"error": str(e)})
        except UnknownKeyError as e:
            self._json(404, {"error": str(e)})
        except Exception as e:  # noqa: BLE001 - a bug in one request must not stop the service
            traceback.print_exc(file=sys.stderr)
            self._json(500, {"error": f"internal error ({type(e).__name__}); see the server log"})
        finally:
            self.app.busy.release()

    # ------------------------------------------------------------------ io

    def _send(self, status: int, body: bytes, ctype: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header(
            "Cache-Control", "no-store" if ctype.startswith("application/json") else "max-age=300"
        )
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, obj: Any) -> None:
        self._send(status, json.dumps(obj).encode(), "application/json; charset=utf-8")

    def _length(self) -> int:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True
            raise ApiError(411, "chunked bodies are not accepted; send a Content-Length")
        raw = self.headers.get("Content-Length")
        if raw is None:
            raise ApiError(411, "a request body needs a Content-Length header")
        try:
            n = int(raw)
        except ValueError:
            n = -1
        if n < 0:
            self.close_connection = True
            raise ApiError(400, f"bad Content-Length {raw[:20]!r}")
        return n

    def _drop_body(self) -> None:
        try:
            n = self._length()
        except ApiError:
            return
        self._discard(n)

    def _discard(self, n: int) -> None:
        left = min(n, DRAIN_CAP)
        while left > 0:
            chunk = self.rfile.read(min(left, 1 << 20))
            if not chunk:
                break
            left -= len(chunk)
        if n > DRAIN_CAP:
            self.close_connection = True

    def body(self) -> bytes:
        n = self._length()
        if n > self.app.max_body:
            self._discard(n)
            raise ApiError(413, f"request body is {n} bytes; the limit is {self.app.max_body} bytes")
        data = self.rfile.read(n)
        if len(data) != n:
            self.close_connection = True
            raise ApiError(400, f"body ended after {len(data)} of {n} bytes")
        return data

    # ------------------------------------------------------------------ endpoints

    def page(self, params: dict[str, str]) -> None:
        html = PAGE.replace("__MAX_K__", str(self.app.max_k))
        self._send(200, html.encode(), "text/html; charset=utf-8")

    def info(self, params: dict[str, str]) -> None:
        app = self.app
        limits = {"max_k": app.max_k, "max_body_bytes": app.max_body, "max_query_chars": app.max_query_chars}
        self._json(200, app.index.info() | {"query_model": app.model_name} | limits)

    def search(self, params: dict[str, str]) -> None:
        if self.command == "POST":
            params = self._json_body()
        t0 = time.perf_counter()
        text, k = self.app.text_of(params.get("q")), self.app.k_of(params.get("k"))
        rows = self.app.search_text(text, k)
        self._json(200, {"query": text, "k": k, "results": rows, "took_ms": _ms(t0)})

    def search_image(self, params: dict[str, str]) -> None:
        k = self.app.k_of(params.get("k"))
        ctype = self.headers.get("Content-Type", "")
        if ctype.startswith("multipart/"):
            self._drop_body()
            raise ApiError(
                415, "send the image file's bytes as the body (Content-Type: image/...), not a form"
            )
        data, t0 = self.body(), time.perf_counter()
        rows = self.app.search_image(data, k)
        self._json(200, {"query": "image upload", "k": k, "results": rows, "took_ms": _ms(t0)})

    def neighbours(self, params: dict[str, str]) -> None:
        key, k = params.get("key"), self.app.k_of(params.get("k"))
        if not key:
            raise ApiError(400, "give the sample's key: /api/neighbours?key=KEY")
        t0 = time.perf_counter()
        rows = self.app.neighbours(key, k)
        self._json(200, {"query": {"key": key}, "k": k, "results": rows, "took_ms": _ms(t0)})

    def metadata(self, params: dict[str, str]) -> None:
        self._json(200, self.app.index.rows([self._id(params)])[0])

    def image(self, params: dict[str, str]) -> None:
        data, ctype = self.app.image(self._id(params))
        self._send(200, data, ctype)

    def _id(self, params: dict[str, str]) -> int:
        if params.get("key"):
            return self.app.index.id_of(params["key"])
        raw = params.get("id", "")
        if not raw.isdigit() or int(raw) >= self.app.index.ntotal:
            raise ApiError(
                404 if raw.isdigit() else 400,
                f"id must be in 0..{self.app.index.ntotal - 1}, got {raw[:20]!r}",
            )
        return int(raw)

    def _json_body(self) -> dict[str, Any]:
        try:
            obj = json.loads(self.body())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ApiError(400, f"the body is not valid JSON ({e})") from None
        if not isinstance(obj, dict):
            raise ApiError(400, 'the body must be a JSON object like {"q": "a dog", "k": 10}')
        return obj


def _ms(t0: float) -> float:
    return round(1000 * (time.perf_counter() - t0), 2)


ROUTES = {
    "/": {"GET": Handler.page},
    "/api/info": {"GET": Handler.info},
    "/api/search": {"GET": Handler.search, "POST": Handler.search},
    "/api/search/image": {"POST": Handler.search_image},
    "/api/neighbours": {"GET": Handler.neighbours},
    "/api/metadata": {"GET": Handler.metadata},
    "/api/image": {"GET": Handler.image},
}


def make_server(
    app: App, host: str = "127.0.0.1", port: int = 8000, verbose: bool = False
) -> ThreadingHTTPServer:
    """A bound, not yet serving, threaded server; port 0 picks a free one (``server.server_port``)."""
    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    server.app = app  # type: ignore[attr-defined]
    server.verbose = verbose  # type: ignore[attr-defined]
    return server
