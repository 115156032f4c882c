"""``clipkit index query``: queries from the command line or a batch file -> rows, as a table or JSON."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from clipkit.data.decode import SampleError, decode_image
from clipkit.errors import ClipkitError
from clipkit.index.embed import embed_images, embed_texts
from clipkit.index.search import SearchIndex

BATCH = 64
MAX_K = 10_000  # k rows per query are materialised; a typo like 10**9 must not allocate them


class QueryError(ClipkitError, ValueError):
    """A query that cannot be run: empty text, unreadable image, bad batch file, bad k."""


def _query(text: Any = None, image: Any = None, where: str = "") -> dict[str, str]:
    if (text is None) == (image is None):
        raise QueryError(
            f"{where}each query is either a text or an image, got text={text!r}, image={image!r}"
        )
    if text is not None:
        if not isinstance(text, str) or not text.strip():
            raise QueryError(f"{where}empty query: give some text to search for")
        return {"text": text.strip()}
    if not isinstance(image, str) or not Path(image).is_file():
        raise QueryError(f"{where}image {image!r} does not exist")
    return {"image": image}


def query_model(index: SearchIndex, spec: str = "", overrides: list[str] | None = None) -> Any:
    """The model to query ``index`` with: ``spec``, or else the one the index records.

    Overrides apply to an explicit spec only; the recorded model gets the recorded overrides.
    A model whose embeddings have another width than the index's is refused.
    """
    from clipkit.models.specs import load_model

    if spec:
        model = load_model(spec, list(overrides or []))
    else:
        recorded = index.report.get("model", "")
        if not recorded:
            raise QueryError(f"index {index.folder} records no model: pass one (--model / model=)")
        model = load_model(recorded, index.report.get("model_overrides", []))
    index.check_model(embed_texts(model, ["probe"]).shape[1], model.resolved)
    return model


def read_queries(text: str | None = None, image: str | None = None, batch: str | None = None) -> list[dict]:
    """Exactly one of ``text``, ``image`` or ``batch`` (text lines, or .jsonl of {"text"|"image"})."""
    if sum(x is not None for x in (text, image, batch)) != 1:
        raise QueryError("give exactly one of --text, --image or --batch")
    if batch is None:
        return [_query(text, image)]
    path = Path(batch)
    if not path.is_file():
        raise QueryError(f"batch file {batch} does not exist")
    lines = [
        (i + 1, line) for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()) if line.strip()
    ]
    if not lines:
        raise QueryError(f"batch file {batch} holds no queries")
    if path.suffix.lower() not in (".jsonl", ".ndjson"):
        return [_query(line) for _, line in lines]
    out = []
    for no, line in lines:
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise QueryError(f"{batch}:{no}: not JSON ({e})") from None
        if not isinstance(obj, dict) or set(obj) - {"text", "image"}:
            raise QueryError(f'{batch}:{no}: each line must be {{"text": ...}} or {{"image": PATH}}')
        out.append(_query(obj.get("text"), obj.get("image"), f"{batch}:{no}: "))
    return out


def run_queries(index: SearchIndex, model: Any, queries: list[dict], k: int) -> list[dict[str, Any]]:
    """[{"query": q, "results": [row + score, ...]}, ...] in the order of ``queries``."""
    if not 1 <= k <= MAX_K:
        raise QueryError(f"k must be between 1 and {MAX_K}, got {k}")
    out: list[dict[str, Any]] = []
    for start in range(0, len(queries), BATCH):
        chunk = queries[start : start + BATCH]
        vectors = [None] * len(chunk)
        texts = [i for i, q in enumerate(chunk) if "text" in q]
        images = [i for i, q in enumerate(chunk) if "image" in q]
        if texts:
            for i, v in zip(texts, embed_texts(model, [chunk[i]["text"] for i in texts])):
                vectors[i] = v
        if images:
            decoded = []
            for i in images:
                try:
                    decoded.append(decode_image(Path(chunk[i]["image"]).read_bytes()))
                except SampleError as e:
                    raise QueryError(f"image {chunk[i]['image']} is not usable ({e})") from None
            for i, v in zip(images, embed_images(model, decoded)):
                vectors[i] = v
        for q, rows in zip(chunk, index.search(vectors, k)):
            out.append({"query": q, "results": rows})
    return out


def format_table(results: list[dict[str, Any]], width: int = 48) -> str:
    lines = []
    for res in results:
        q = res["query"]
        lines.append(f"query: {q.get('text') or q.get('image')}")
        lines.append(f"  {'rank':>4}  {'score':>7}  {'key':<24}  {'caption':<{width}}  source")
        for rank, row in enumerate(res["results"], 1):
            caption = (row.get("caption") or "")[:width]
            lines.append(
                f"  {rank:>4}  {row['score']:>7.4f}  {row['key']:<24}  {caption:<{width}}  {row.get('source', '')}"
            )
    return "\n".join(lines)
