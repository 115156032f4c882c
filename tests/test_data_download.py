"""Fetcher against a local failing server: each failure gets its error class, retries only where a
retry can help, a deadline on the whole body, and clipkit's User-Agent."""

from __future__ import annotations

import time

import pytest
from data_helpers import FailingServer, jpeg

from clipkit import __version__
from clipkit.data.download import Fetcher, FetchError


@pytest.fixture(scope="module")
def server():
    with FailingServer(hang_s=1.5) as srv:
        srv.images["a.jpg"] = jpeg(seed=1)
        yield srv


def kind(fetcher: Fetcher, url: str) -> str:
    with pytest.raises(FetchError) as err:
        fetcher.fetch(url)
    return err.value.kind


FAST = Fetcher(timeout=0.4, retries=2, backoff=0.01)


def test_ok_slow_and_user_agent(server):
    assert FAST.fetch(server.url("ok/a.jpg")) == server.images["a.jpg"]
    assert FAST.fetch(server.url("slow/a.jpg")) == server.images["a.jpg"]  # 0.2 s < 0.4 s timeout
    assert any(ua.startswith(f"clipkit/{__version__}") for ua in server.user_agents)


def test_http_status_is_final_unless_retryable(server):
    assert kind(FAST, server.url("status/404")) == "http_404"
    assert server.hits["/status/404"] == 1  # no retry for a 404
    assert kind(FAST, server.url("status/500")) == "http_500"
    assert server.hits["/status/500"] == 3  # 1 + 2 retries
    assert FAST.fetch(server.url("flaky/a.jpg")) == server.images["a.jpg"]  # 503, then ok
    assert server.hits["/flaky/a.jpg"] == 2


def test_hang_and_trickle_time_out_within_bounds(server):
    one = Fetcher(timeout=0.3, retries=1, backoff=0.01)
    start = time.monotonic()
    assert kind(one, server.url("hang/x")) == "timeout"
    assert kind(one, server.url("trickle/x")) == "timeout"  # bytes keep coming, but too slowly
    # Each attempt ends after at most ~2x timeout: 2 URLs x 2 attempts x 0.6 s, plus slack.
    assert time.monotonic() - start < 4.0
    assert server.hits["/hang/x"] == 2


def test_size_limit_connection_error_and_bad_url(server):
    assert kind(Fetcher(max_bytes=100, retries=0), server.url("ok/a.jpg")) == "too_large_download"
    closed = "http://127.0.0.1:9/x.jpg"  # discard port: nothing listens there
    assert kind(Fetcher(timeout=0.5, retries=0), closed) == "connection_error"
    assert kind(FAST, "ftp://example.org/x.jpg") == "bad_url"
