"""Embedding export: rows map back to their samples, bad samples are counted, runs resume."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pandas as pd
import pytest
from index_helpers import color_model, square_png, write_square_shards, write_squares
from PIL import Image

from clipkit.index.embed import EmbedError, embed_collection, embed_images, embed_texts
from clipkit.index.sources import SourceError, open_source
from clipkit.index.store import EmbeddingSet, finish

QUIET = {"log": lambda _: None}


def export(source, out, **kw):
    config, parts = embed_collection(
        color_model(), source, out, model_name="index_helpers:color_model", **QUIET, **kw
    )
    return finish(out, config, parts)


def test_shard_rows_map_back_to_their_samples(tmp_path):
    shards = write_square_shards(tmp_path / "shards", per_shard=8)
    info = export(open_source(shards=str(tmp_path / "shards")), tmp_path / "emb", dtype="float32")
    assert info["rows"] == 19 and info["skipped"] == {"decode_error": 1}  # 20 samples, one not an image
    emb = EmbeddingSet(tmp_path / "emb")
    meta = emb.metadata().to_pandas()
    vectors = np.concatenate([v for _, v in emb.iter_parts()])
    assert len(meta) == len(vectors) == 19
    by_shard = {}
    for shard in shards:
        with tarfile.open(shard) as tar:
            names = [m.name for m in tar.getmembers() if m.name.endswith(".png")]
            by_shard[str(shard)] = [(n[:-4], tar.extractfile(n).read()) for n in names]
    model = color_model()
    for row, vec in zip(meta.itertuples(), vectors):
        key, png = by_shard[row.shard][row.offset]  # shard + offset lead back to the sample
        assert key == row.key and row.source == f"https://example.com/{key}.png"
        assert row.caption == f"a {key[:-1]} square" and row.idx >= 0
        np.testing.assert_allclose(vec, embed_images(model, [Image.open(io.BytesIO(png))])[0], atol=1e-6)
    with pytest.raises(EmbedError, match=r"shard-000000.tar: sample 'green1' at offset 3: decode_error"):
        export(open_source(shards=str(tmp_path / "shards")), tmp_path / "emb_strict", on_error="raise")


def test_folder_export_resumes_and_skips_finished_parts(tmp_path):
    write_squares(tmp_path / "images")
    source = open_source(folder=str(tmp_path / "images"), part_size=7)
    first = export(source, tmp_path / "emb")
    assert first["rows"] == 30 and first["part_rows"] == [7, 7, 7, 7, 2]
    before = {p.name: p.read_bytes() for p in (tmp_path / "emb").glob("part-*")}
    # A run killed inside part 2: its marker and vectors are missing, the other parts are done.
    (tmp_path / "emb" / "part-00002.json").unlink()
    (tmp_path / "emb" / "part-00002.npy").unlink()
    (tmp_path / "emb" / "embed_info.json").unlink()
    lines = []
    config, parts = embed_collection(color_model(), source, tmp_path / "emb", model_name="index_helpers:color_model",
                                     log=lines.append)  # fmt: skip
    assert sum("already done" in line for line in lines) == 4 and "part 3/5" in lines[2]
    assert finish(tmp_path / "emb", config, parts)["rows"] == 30
    after = {p.name: p.read_bytes() for p in (tmp_path / "emb").glob("part-*")}
    assert {k: v for k, v in after.items() if not k.endswith(".json")} == {
        k: v for k, v in before.items() if not k.endswith(".json")
    }
    with pytest.raises(EmbedError, match=r"other settings \(dtype: 'float16' -> 'float32'\)"):
        export(source, tmp_path / "emb", dtype="float32")


def test_ranks_split_the_parts(tmp_path):
    write_squares(tmp_path / "images")
    source = open_source(folder=str(tmp_path / "images"), part_size=7)
    for rank in (1, 0):
        config, parts = embed_collection(color_model(), source, tmp_path / "emb", model_name="m", rank=rank,
                                         world_size=2, **QUIET)  # fmt: skip
        if rank == 1:
            assert sorted(p.stem for p in (tmp_path / "emb").glob("part-*.json")) == [
                "part-00001",
                "part-00003",
            ]
    info = finish(tmp_path / "emb", config, parts)
    single = export(source, tmp_path / "single")
    assert info["rows"] == single["rows"] == 30
    a = np.concatenate([v for _, v in EmbeddingSet(tmp_path / "emb").iter_parts()])
    b = np.concatenate([v for _, v in EmbeddingSet(tmp_path / "single").iter_parts()])
    np.testing.assert_array_equal(a, b)


def test_manifest_and_text_modality(tmp_path):
    (tmp_path / "img").mkdir()
    rows = []
    for i, color in enumerate(["red", "green", "blue"]):
        (tmp_path / "img" / f"{color}.png").write_bytes(square_png(color))
        rows.append({"path": f"img/{color}.png", "key": f"k{i}", "caption": f"a {color} tile"})
    rows.append({"path": "img/missing.png", "key": "k3", "caption": "gone"})
    pd.DataFrame(rows).to_csv(tmp_path / "m.csv", index=False)
    info = export(open_source(manifest=str(tmp_path / "m.csv")), tmp_path / "emb")
    assert info["rows"] == 3 and info["skipped"] == {"unreadable_file": 1}
    meta = EmbeddingSet(tmp_path / "emb").metadata().to_pandas()
    assert meta.key.tolist() == ["k0", "k1", "k2"] and meta.source[0] == str(tmp_path / "img" / "red.png")
    text = export(open_source(manifest=str(tmp_path / "m.csv")), tmp_path / "emb_text", modality="text")
    assert text["rows"] == 4  # captions need no image file
    model = color_model()
    got = np.concatenate([v for _, v in EmbeddingSet(tmp_path / "emb_text").iter_parts()])
    np.testing.assert_allclose(got[0], embed_texts(model, ["a red tile"])[0], atol=2e-3)  # float16 storage


def test_bad_inputs_are_clear_errors(tmp_path):
    with pytest.raises(SourceError, match="exactly one input"):
        open_source(folder="a", manifest="b")
    with pytest.raises(SourceError, match="does not exist"):
        open_source(folder=str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="holds no"):
        open_source(folder=str(tmp_path / "empty"))
    (tmp_path / "m.csv").write_text("file,caption\nx.png,a\n")
    with pytest.raises(SourceError, match="needs a 'path'"):
        open_source(manifest=str(tmp_path / "m.csv"))
    with pytest.raises(SourceError, match="matches no existing file"):
        open_source(shards=str(tmp_path / "s-{000..003}.tar"))
