"""The query service against a live server on 127.0.0.1: answers, every bad input, the page.

The index holds coloured squares embedded with ``ColorModel`` (text "red" -> red squares), so
right answers are known; each bad request must get a 4xx JSON error and leave the server up.
"""

from __future__ import annotations

import http.client
import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from index_helpers import COLORS, color_model, square_png, wide_model, write_squares

from clipkit.index.build import build_index
from clipkit.index.embed import embed_collection, embed_texts
from clipkit.index.search import SearchIndex, SearchIndexError
from clipkit.index.server import App, make_server
from clipkit.index.sources import open_source
from clipkit.index.store import finish

MAX_K = 20


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    keys = write_squares(root / "images")
    model = color_model()
    config, parts = embed_collection(
        model, open_source(folder=str(root / "images"), part_size=8), root / "emb",
        model_name="index_helpers:color_model", log=lambda _: None,
    )  # fmt: skip
    finish(root / "emb", config, parts)
    build_index(root / "emb", root / "index", speed_seconds=0.01, log=lambda _: None)
    index = SearchIndex(root / "index")
    app = App(index, model, "index_helpers:color_model", max_k=MAX_K, max_body=1 << 20)
    server = make_server(app, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield {"root": root, "port": server.server_port, "keys": keys, "model": model, "index": index}
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def request(served, method, path, body=None, headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", served["port"], timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        data = resp.read()
        ctype = resp.getheader("Content-Type", "")
        return resp.status, (json.loads(data) if ctype.startswith("application/json") else data)
    finally:
        conn.close()


def assert_alive(served):
    status, info = request(served, "GET", "/api/info")
    assert status == 200 and info["ntotal"] == len(served["keys"])


def exact_keys(served, text=None, key=None, k=10):
    """The oracle: numpy brute force over the stored embeddings (a text, or a key's neighbours)."""
    emb = np.concatenate(
        [np.load(p).astype(np.float32) for p in sorted((served["root"] / "emb").glob("part-*.npy"))]
    )
    keys = pq.read_table(served["root"] / "index" / "metadata.parquet").column("key").to_pylist()
    query = embed_texts(served["model"], [text])[0] if text else emb[keys.index(key)]
    order = [keys[i] for i in np.argsort(-(emb @ query), kind="stable")]
    return [x for x in order if x != key][:k]


def test_text_search_matches_brute_force_and_serves_images(served):
    status, body = request(served, "GET", "/api/search?q=red&k=3")
    assert status == 200
    keys = [r["key"] for r in body["results"]]
    assert keys == exact_keys(served, "red", k=3)
    assert all(k.startswith("red_") for k in keys)
    scores = [r["score"] for r in body["results"]]
    assert scores == sorted(scores, reverse=True)
    status, png = request(served, "GET", body["results"][0]["image"])
    assert status == 200 and png == (served["root"] / "images" / f"{keys[0]}.png").read_bytes()


def test_post_json_search_and_image_upload(served):
    status, body = request(served, "POST", "/api/search", json.dumps({"q": "a blue thing", "k": 2}))
    assert status == 200 and [r["key"][:5] for r in body["results"]] == ["blue_", "blue_"]
    upload = square_png("green")
    status, body = request(served, "POST", "/api/search/image?k=1", upload, {"Content-Type": "image/png"})
    assert status == 200 and body["results"][0]["key"] == "green_0"


def test_neighbours_and_metadata_by_key(served):
    status, body = request(served, "GET", "/api/neighbours?key=yellow_0&k=2")
    assert status == 200
    assert [r["key"] for r in body["results"]] == exact_keys(served, key="yellow_0", k=2)  # itself excluded
    status, row = request(served, "GET", "/api/metadata?key=yellow_0")
    assert status == 200 and row["caption"] == "a yellow square, shade 0"
    assert row["source"].endswith("yellow_0.png")


BAD = [
    ("empty query", "GET", "/api/search?q=&k=3", None, {}, 400, "empty query"),
    ("blank query", "POST", "/api/search", json.dumps({"q": "   "}), {}, 400, "empty query"),
    ("k=0", "GET", "/api/search?q=red&k=0", None, {}, 400, f"between 1 and {MAX_K}"),
    ("k=10^9", "GET", f"/api/search?q=red&k={10**9}", None, {}, 400, f"between 1 and {MAX_K}"),
    ("k not a number", "GET", "/api/search?q=red&k=ten", None, {}, 400, "must be an integer"),
    ("unknown key", "GET", "/api/neighbours?key=no_such_key&k=3", None, {}, 404, "unknown key 'no_such_key'"),
    ("unknown key, metadata", "GET", "/api/metadata?key=nope", None, {}, 404, "unknown key"),
    ("non-image upload", "POST", "/api/search/image?k=3", b"%PDF-1.4 not an image", {}, 400, "not a usable image"),
    ("empty upload", "POST", "/api/search/image?k=3", b"", {}, 400, "empty upload"),
    ("form upload", "POST", "/api/search/image", b"--x\r\n", {"Content-Type": "multipart/form-data; boundary=x"},
     415, "not a form"),
    ("bad json", "POST", "/api/search", b"{q: red", {}, 400, "not valid JSON"),
    ("json not an object", "POST", "/api/search", b'["red"]', {}, 400, "JSON object"),
    ("id out of range", "GET", "/api/image?id=999999", None, {}, 404, "id must be in"),
    ("unknown endpoint", "GET", "/api/nope", None, {}, 404, "no such endpoint"),
    ("wrong method", "DELETE", "/api/search", None, {}, 405, "GET or POST"),
]  # fmt: skip


@pytest.mark.parametrize("name,method,path,body,headers,status,message", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_a_clear_error_and_the_server_lives(
    served, name, method, path, body, headers, status, message
):
    got, payload = request(served, method, path, body, headers)
    assert got == status, payload
    assert message in payload["error"]
    assert_alive(served)


def test_50mb_body_is_refused_and_the_server_lives(served):
    body = b"\xff" * (50 * 2**20)
    status, payload = request(served, "POST", "/api/search/image?k=3", body, {"Content-Type": "image/png"})
    assert status == 413 and "limit is 1048576 bytes" in payload["error"]
    status, payload = request(served, "POST", "/api/search", body)
    assert status == 413
    assert_alive(served)


def test_index_of_another_model_dimension_is_refused(served):
    with pytest.raises(SearchIndexError, match=r"holds 16-d embeddings .* embeds to 24-d"):
        App(served["index"], wide_model(), "index_helpers:wide_model")
    assert_alive(served)


def test_metadata_out_of_step_is_refused(served, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(served["root"] / "index", bad)
    table = pq.read_table(bad / "metadata.parquet")
    pq.write_table(table.slice(0, table.num_rows - 1), bad / "metadata.parquet")
    with pytest.raises(
        SearchIndexError, match=r"metadata.parquet has 29 rows but index.faiss holds 30 .* out of step"
    ):
        SearchIndex(bad)
    assert_alive(served)


def test_page_in_headless_chromium(served):
    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(chromium).exists():
        pytest.fail("Debian chromium is needed for this test: make debs (apt-get install chromium)")
    from chromium_cdp import Chromium

    with Chromium(chromium) as browser:
        page = browser.open(f"http://127.0.0.1:{served['port']}/")
        page.evaluate("document.getElementById('k').value = '4'; document.getElementById('q').focus()")
        page.type_text("red")
        page.press_enter()
        hits = page.wait_for(
            """(() => { const figs = [...document.querySelectorAll('#results figure.hit')];
                 const imgs = figs.map(f => f.querySelector('img'));
                 if (figs.length < 4 || !imgs.every(i => i.complete && i.naturalWidth > 0)) return null;
                 return figs.map((f, i) => ({key: f.dataset.key, width: imgs[i].naturalWidth,
                   caption: f.querySelector('figcaption').textContent,
                   score: f.querySelector('.score').textContent})); })()"""
        )
        assert [h["key"] for h in hits] == exact_keys(served, "red", k=4)
        assert all(h["width"] == 12 for h in hits)  # the squares' real pixels came back
        assert hits[0]["caption"] == "a red square, shade 0" and hits[0]["score"].startswith("score ")
        # An empty query shows the server's error on the page, and the grid empties.
        page.evaluate("document.getElementById('q').value = ''; document.getElementById('q').focus()")
        page.press_enter()
        error = page.wait_for("document.getElementById('status').className === 'error' && "
                              "document.getElementById('status').textContent")  # fmt: skip
        assert "empty query" in error
        assert page.evaluate("document.querySelectorAll('#results figure').length") == 0
        # Clicking a result asks for its neighbours.
        page.evaluate("document.getElementById('q').value = 'blue'")
        page.press_enter()
        page.wait_for("document.querySelectorAll('#results figure.hit').length === 4")
        page.evaluate("document.querySelector('#results figure.hit').click()")
        keys = page.wait_for(
            "(() => { const k = [...document.querySelectorAll('#results figure.hit')].map(f => f.dataset.key);"
            " return k.length === 4 && !k.includes('blue_0') ? k : null; })()"
        )
        assert keys[0].startswith("blue_")
    assert len(COLORS) * 3 == len(served["keys"])
