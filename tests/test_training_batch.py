"""Only model inputs reach the model and the loss; the loader's bookkeeping travels beside them."""

from __future__ import annotations

import pytest
import torch
from training_helpers import tiny_tree, write_shards

from clipkit.config import Config, from_dict
from clipkit.training import loop
from clipkit.training.sample_log import read_sample_log, sample_log_path
from clipkit.training.stream import MODEL_INPUTS, BatchMeta, split_inputs

pytestmark = pytest.mark.usefixtures("one_thread")


def loader_batch(**extra) -> dict:
    return {
        "image": torch.zeros(2, 3, 4, 4),
        "text": torch.ones(2, 5, dtype=torch.long),
        "key": ["a", "b"],
        "idx": torch.tensor([3, 4]),
        "skipped": {"decode_error": 1},
        **extra,
    }


def test_split_inputs_parts_model_inputs_from_bookkeeping():
    inputs, meta = split_inputs(loader_batch(stream={"worker": 0}, epoch=2))
    assert list(inputs) == ["image", "text", "idx"]
    assert meta == BatchMeta(keys=["a", "b"], epoch=2, skipped={"decode_error": 1}) and len(meta) == 2
    assert split_inputs(loader_batch(epoch=2), epoch=5)[1].epoch == 5  # the stream's epoch wins
    features = {"image_features": torch.zeros(2, 8), "text": torch.ones(2, 5), "key": ["a", "b"]}
    assert list(split_inputs(features)[0]) == ["image_features", "text"]
    empty_inputs, empty = split_inputs({"key": [], "idx": torch.empty(0), "skipped": {"x": 2}})
    assert len(empty) == 0 and empty.skipped == {"x": 2} and list(empty_inputs) == ["idx"]


def test_a_key_that_is_neither_input_nor_bookkeeping_is_refused():
    with pytest.raises(ValueError, match=r"'label' are neither model inputs"):
        split_inputs(loader_batch(label=torch.zeros(2)))


class KeySpy(torch.nn.Module):
    """Wraps the run's loss and records the keys of every batch it is given."""

    def __init__(self, inner: torch.nn.Module, seen: list[list[str]]):
        super().__init__()
        self.inner, self.seen = inner, seen

    def forward(self, out: dict, batch: dict | None = None) -> dict:
        self.seen.append(sorted(batch or {}))
        return self.inner(out, batch)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    return write_shards(tmp_path_factory.mktemp("shards"), n_shards=2, per_shard=16, idx=True)


@pytest.mark.parametrize(
    "overrides",
    [
        {},  # feature cache: "image_features"
        {"train.feature_cache": False, "train.grad_cache_micro_batch": 4, "optim.accum_steps": 2},
        {"loss.name": "sogclr", "loss.args": {"num_samples": 32}, "train.log_sample_ids": True},
    ],
    ids=["cached", "images-gradcache-accum", "sogclr-reads-idx"],
)
def test_only_model_inputs_reach_the_model_and_the_loss(shards, tmp_path, monkeypatch, overrides):
    to_loss: list[list[str]] = []
    to_model: list[list[str]] = []
    real_loss, real_model = loop.build_loss, loop.build_model

    def spied_model(cfg):
        model = real_model(cfg)
        forward = model.forward

        def spy(batch: dict) -> dict:
            to_model.append(sorted(batch))
            return forward(batch)

        model.forward = spy  # an instance attribute: nn.Module.__call__ runs it
        return model

    monkeypatch.setattr(loop, "build_loss", lambda cfg: KeySpy(real_loss(cfg), to_loss))
    monkeypatch.setattr(loop, "build_model", spied_model)
    tree = tiny_tree(shards, tmp_path / "runs", **{"train.samples": 48, "train.checkpoint_every": 100})
    for dotted, value in overrides.items():
        section, key = dotted.split(".")
        tree.setdefault(section, {})[key] = value
    run_dir = loop.train(from_dict(Config, tree))
    allowed = set(MODEL_INPUTS)
    assert to_loss and to_model
    for keys in to_loss + to_model:
        assert set(keys) <= allowed, keys
        assert "text" in keys and "idx" in keys and len({"image", "image_features"} & set(keys)) == 1, keys
    if overrides.get("train.log_sample_ids"):  # the bookkeeping still reaches the sample log
        log = read_sample_log(sample_log_path(run_dir))
        assert sorted(log) == [1, 2, 3, 4, 5, 6]  # 48 samples in steps of 8
        epochs = [[epoch for epoch, _ in log[step]] for step in sorted(log)]
        assert epochs == [[0]] * 4 + [[1]] * 2  # 32 samples per pass
        first_pass = [i for step in (1, 2, 3, 4) for _, ids in log[step] for i in ids]
        assert sorted(first_pass) == list(range(32))
