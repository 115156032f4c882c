"""Fetch one URL with a deadline, retries and a user agent; every failure gets an error class.

    data = fetch("https://example.org/cat.jpg", Fetcher(timeout=10, retries=2))
    # FetchError("timeout" | "http_404" | "connection_error" | "too_large_download" | ...)

Only the standard library (``urllib``): downloads run in a thread pool (``clipkit.data.build``),
which suits blocking I/O. ``timeout`` bounds each socket wait *and* the whole body (checked
between reads), so a server that trickles bytes cannot hold a thread for ever: an attempt
ends after at most about twice ``timeout``.
Retries (with exponential backoff) are for failures that may pass: timeouts, connection
errors, cut-off bodies, HTTP 408 / 429 / 5xx. A 404 is final at once.
"""

from __future__ import annotations

import http.client
import ssl
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

from clipkit._version import __version__

USER_AGENT = f"clipkit/{__version__} (+https://github.com/clipkit; image-text dataset builder)"
RETRYABLE_STATUS = {408, 425, 429, 500, 502, 503, 504}


class FetchError(Exception):
    """A download that failed; ``kind`` is the error class counted in ``_stats.json``."""

    def __init__(self, kind: str, detail: str = ""):
        super().__init__(f"{kind}: {detail}" if detail else kind)
        self.kind, self.detail = kind, detail

    @property
    def retryable(self) -> bool:
        if self.kind.startswith("http_"):
            return int(self.kind[5:]) in RETRYABLE_STATUS
        return self.kind in ("timeout", "connection_error", "incomplete_download")


@dataclass(frozen=True)
class Fetcher:
    """Download settings; ``fetch(url)`` returns the body bytes or raises ``FetchError``."""

    timeout: float = 10.0  # seconds for one whole attempt
    retries: int = 2  # further attempts after a retryable failure
    backoff: float = 0.5  # seconds before the first retry, doubled each time
    user_agent: str = USER_AGENT
    max_bytes: int = 50 << 20  # larger bodies are refused (too_large_download)

    def fetch(self, url: str) -> bytes:
        for attempt in range(self.retries + 1):
            try:
                return self._once(url)
            except FetchError as err:
                if not err.retryable or attempt == self.retries:
                    raise
            time.sleep(self.backoff * 2**attempt)
        raise AssertionError("unreachable")

    def _once(self, url: str) -> bytes:
        if not url.startswith(("http://", "https://")):
            raise FetchError("bad_url", f"not an http(s) URL: {url[:200]!r}")
        deadline = time.monotonic() + self.timeout
        request = urllib.request.Request(url, headers={"User-Agent": self.user_agent, "Accept": "image/*"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return self._read_body(response, deadline)
        except FetchError:
            raise
        except urllib.error.HTTPError as e:
            raise FetchError(f"http_{e.code}", str(e.reason)) from None
        except TimeoutError as e:
            raise FetchError("timeout", f"no answer within {self.timeout:g} s ({e})") from None
        except urllib.error.URLError as e:
            if isinstance(e.reason, TimeoutError):
                raise FetchError("timeout", f"no answer within {self.timeout:g} s") from None
            raise FetchError("connection_error", str(e.reason)) from None
        except http.client.IncompleteRead as e:
            raise FetchError("incomplete_download", f"body cut off after {len(e.partial)} bytes") from None
        except (http.client.HTTPException, ConnectionError, ssl.SSLError, OSError) as e:
            raise FetchError("connection_error", f"{type(e).__name__}: {e}") from None

    def _read_body(self, response: http.client.HTTPResponse, deadline: float) -> bytes:
        declared = response.headers.get("Content-Length")
        if declared and declared.isdigit() and int(declared) > self.max_bytes:
            raise FetchError("too_large_download", f"Content-Length {declared} > {self.max_bytes} bytes")
        parts, size = [], 0
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise FetchError("timeout", f"body not complete within {self.timeout:g} s")
            chunk = response.read1(1 << 16)
            if not chunk:
                break
            parts.append(chunk)
            size += len(chunk)
            if size > self.max_bytes:
                raise FetchError("too_large_download", f"body over {self.max_bytes} bytes")
        if declared and declared.isdigit() and size < int(declared):
            raise FetchError("incomplete_download", f"got {size} of {declared} bytes")
        return b"".join(parts)
