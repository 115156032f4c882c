"""Checkpoints: atomic save, sidecar-verified latest(), clear errors for truncated or foreign files."""

from __future__ import annotations

import json
import random
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from clipkit.data import atomic
from clipkit.training import checkpoint as ckpt


def state(step: int, width: int = 4) -> dict:
    torch.manual_seed(step)
    model = nn.Linear(width, 3)
    return {"model": model.state_dict(), "step": step, "samples_seen": 10 * step, "config": {"model": {}}}


def steps(run_dir) -> list[int]:
    return [int(p.stem.split("_")[1]) for p in ckpt.list_checkpoints(run_dir)]


def test_save_writes_sidecar_and_keeps_last(tmp_path):
    for s in range(1, 6):
        ckpt.save(tmp_path, s, state(s), keep_last=3)
    assert steps(tmp_path) == [3, 4, 5]
    assert sorted(p.name for p in ckpt.checkpoint_dir(tmp_path).iterdir()) == [
        f"step_{s:08d}.{ext}" for s in (3, 4, 5) for ext in ("json", "pt")
    ]
    side = json.loads((ckpt.checkpoint_dir(tmp_path) / "step_00000005.json").read_text())
    path = ckpt.checkpoint_path(tmp_path, 5)
    assert side["size"] == path.stat().st_size and side["step"] == 5 and side["samples_seen"] == 50
    assert ckpt.latest(tmp_path) == path
    torch.testing.assert_close(ckpt.load(path)["model"], state(5)["model"])


def test_crash_before_rename_leaves_previous_latest(tmp_path, monkeypatch):
    ckpt.save(tmp_path, 10, state(10))
    good = ckpt.latest(tmp_path)

    def dies(src, dst):
        raise KeyboardInterrupt("killed between write and rename")

    monkeypatch.setattr(atomic.os, "replace", dies)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save(tmp_path, 20, state(20))
    monkeypatch.undo()
    assert ckpt.latest(tmp_path) == good
    assert steps(tmp_path) == [10]
    # A SIGKILL leaves its temporary file behind: it is never taken for a checkpoint.
    (ckpt.checkpoint_dir(tmp_path) / ".step_00000030.pt.abc123.tmp").write_bytes(b"partial")
    assert ckpt.latest(tmp_path) == good


def test_crash_before_sidecar_falls_back_with_warning(tmp_path, monkeypatch):
    ckpt.save(tmp_path, 10, state(10))

    def dies(path, text):
        raise KeyboardInterrupt("killed before the sidecar")

    monkeypatch.setattr(ckpt, "atomic_write_text", dies)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save(tmp_path, 20, state(20))
    monkeypatch.undo()
    assert ckpt.checkpoint_path(tmp_path, 20).is_file()  # renamed, but unconfirmed
    with pytest.warns(
        UserWarning, match=r"step_00000020\.pt has no sidecar.*falling back to .*step_00000010\.pt"
    ):
        assert ckpt.latest(tmp_path) == ckpt.checkpoint_path(tmp_path, 10)


def truncate(path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def test_truncated_checkpoint_is_skipped_by_latest(tmp_path):
    for s in (10, 20, 30):
        ckpt.save(tmp_path, s, state(s))
    truncate(ckpt.checkpoint_path(tmp_path, 30))
    with pytest.warns(UserWarning) as record:
        found = ckpt.latest(tmp_path)
    assert found == ckpt.checkpoint_path(tmp_path, 20)
    msg = str(record[0].message)
    assert "step_00000030.pt is truncated" in msg and "falling back to" in msg and "step_00000020.pt" in msg


def test_corrupt_same_size_checkpoint_is_caught_by_hash(tmp_path):
    for s in (10, 20):
        ckpt.save(tmp_path, s, state(s))
    path = ckpt.checkpoint_path(tmp_path, 20)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="sha256 differs"):
        assert ckpt.latest(tmp_path) == ckpt.checkpoint_path(tmp_path, 10)


def test_no_good_checkpoint_returns_none_with_warning(tmp_path):
    ckpt.save(tmp_path, 10, state(10))
    truncate(ckpt.checkpoint_path(tmp_path, 10))
    with pytest.warns(UserWarning, match="no good checkpoint is left"):
        assert ckpt.latest(tmp_path) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ckpt.latest(tmp_path / "nothing-here") is None


def test_loading_a_truncated_file_raises_clearly(tmp_path):
    path = ckpt.save(tmp_path, 10, state(10))
    truncate(path)
    with pytest.raises(
        ckpt.CheckpointError, match=r"step_00000010\.pt is truncated: \d+ bytes, its sidecar says"
    ):
        ckpt.load(path)
    ckpt.sidecar_path(path).unlink()  # without a sidecar, torch's own failure is translated
    with pytest.raises(ckpt.CheckpointError, match="truncated or corrupt"):
        ckpt.load(path)


def test_other_architecture_names_keys_and_what_to_check(tmp_path):
    class A(nn.Module):
        def __init__(self, width: int):
            super().__init__()
            self.vision_proj = nn.Linear(width, 3)
            self.text_proj = nn.Linear(4, 3)

    saved = {"model": A(8).state_dict(), "config": {"model": {"vision": {"name": "timm:x"}, "embed_dim": 3}}}
    with pytest.raises(ckpt.CheckpointError) as err:
        ckpt.load_model_state(A(4), saved["model"], "ck.pt", saved["config"])
    msg = str(err.value)
    assert "vision_proj.weight: checkpoint (3, 8) vs model (3, 4)" in msg
    assert "model.vision.name" in msg and "model.vision='timm:x'" in msg
    other = nn.Sequential(nn.Linear(4, 3))
    with pytest.raises(ckpt.CheckpointError, match=r"2 missing \(e\.g\. 0\.weight, 0\.bias\).*4 unexpected"):
        ckpt.load_model_state(other, saved["model"], "ck.pt", saved["config"])


def test_rng_states_round_trip_through_a_checkpoint(tmp_path):
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    rng = ckpt.capture_rng()
    expected = (random.random(), np.random.rand(), torch.rand(3))
    path = ckpt.save(tmp_path, 1, {"model": {}, "rng": rng})
    random.seed(2), np.random.seed(2), torch.manual_seed(2)
    ckpt.restore_rng(ckpt.load(path)["rng"])  # weights_only load: only plain types inside
    got = (random.random(), np.random.rand(), torch.rand(3))
    assert got[:2] == expected[:2]
    torch.testing.assert_close(got[2], expected[2])
