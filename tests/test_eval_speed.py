"""Evaluation's speed levers leave the numbers alone.

Oracles: the plain pass (contiguous layout, no prefetch thread, no workers, fp32, prompts encoded
per dataset). Channels-last on a convolutional image side gives embeddings equal to 1e-5 with
the same argmax, and a ViT keeps its plain layout (bit-identical); the prefetch thread gives the
same batches in the same order; loader workers give the same ordered results; the class weights
of a (class names, prompts) pair are encoded once per model and give identical scores; the locked
tower cache stays bit-identical with a convolutional tower; bf16 runs only where it is native and
asked for.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import timm
import torch
from eval_helpers import ColorModel, wds_classification, wds_retrieval
from torch import nn
from torchvision import transforms as T

from clipkit.cli.main import main as clipkit_main
from clipkit.config import load_config, to_dict
from clipkit.errors import ClipkitError
from clipkit.evaluation import runner as runner_mod
from clipkit.evaluation.dataspec import open_dataset
from clipkit.evaluation.embed import embed_dataset
from clipkit.evaluation.runner import RunOptions, run_suite
from clipkit.evaluation.suite import parse_suite
from clipkit.evaluation.zeroshot import build_classifier
from clipkit.models import build_model
from clipkit.models import embed as embed_mod
from clipkit.models.embed import (
    bf16_support,
    check_precision,
    convolutional,
    encode_images,
    eval_mode,
    image_batches,
    image_inference,
)
from clipkit.training import checkpoint as ckpt


class ConvModel(ColorModel):
    """ColorModel's text side with a random EfficientNet-Lite0 image side (a real CNN: depthwise
    convolutions, batch norm) and a linear head to its D = 4."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.trunk = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0)
        self.head = nn.Linear(self.trunk.num_features, 4, bias=False)
        self.layouts: list[bool] = []  # per trunk call: was the input channels-last?
        self.trunk.register_forward_pre_hook(
            lambda _m, args: self.layouts.append(args[0].is_contiguous(memory_format=torch.channels_last))
        )

    def image_transform(self, train: bool = False):
        return T.Compose([T.Resize(32), T.ToTensor(), T.Normalize((0.5,) * 3, (0.5,) * 3)])

    def image_side(self) -> nn.Module:
        return nn.ModuleList([self.trunk, self.head])

    def encode_image(self, image=None, image_features=None, normalize=True):
        x = self.head(self.trunk(image))  # (B, 4)
        return nn.functional.normalize(x, dim=-1) if normalize else x


def plain_embeddings(model, dataset, batch_size: int) -> tuple[torch.Tensor, list[str]]:
    """The oracle: contiguous layout, no prefetch thread, no workers, fp32."""
    rows, keys = [], []
    with eval_mode(model):
        for batch in image_batches(model, dataset, batch_size, 0, prefetch=0):
            rows.append(encode_images(model, batch["image"], torch.device("cpu")))
            keys += batch["key"]
    return torch.cat(rows), keys


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("speed")
    return {
        "cls": wds_classification(root / "cls", n=30, per_shard=7),
        "ret": wds_retrieval(root / "ret", n=13, per_shard=5),
    }


def test_channels_last_gives_the_plain_embeddings_and_argmax(data):
    model = ConvModel()
    ds = open_dataset(str(data["cls"]))
    want, keys = plain_embeddings(model, ds, 8)
    assert model.layouts and not any(model.layouts)  # the oracle ran contiguous
    model.layouts.clear()
    got = embed_dataset(model, ds, batch_size=8)
    assert model.layouts and all(model.layouts)  # the lever ran: channels-last input
    assert got.keys == keys
    torch.testing.assert_close(got.image_emb, want, atol=1e-5, rtol=0)
    classifier = build_classifier(model, list(ds.classnames), ds.templates)  # (C, 4)
    assert torch.equal((got.image_emb @ classifier.T).argmax(1), (want @ classifier.T).argmax(1))
    # The layout is put back: the weights are ordinary contiguous tensors again.
    conv = next(m for m in model.trunk.modules() if isinstance(m, nn.Conv2d) and m.weight.shape[-1] > 1)
    assert conv.weight.is_contiguous()


def test_a_vit_keeps_its_layout_and_its_bits(data):
    """One convolution (a patch embedding) is not a CNN: nothing changes, bit for bit."""

    class PatchModel(ConvModel):
        def __init__(self) -> None:
            super().__init__()
            self.trunk = nn.Sequential(nn.Conv2d(3, 8, 4, stride=4), nn.Flatten(1), nn.LazyLinear(16))
            self.head = nn.Linear(16, 4, bias=False)

    model = PatchModel()
    assert convolutional(ConvModel().trunk) and not convolutional(model.trunk)
    ds = open_dataset(str(data["cls"]))
    want, _ = plain_embeddings(model, ds, 8)
    assert torch.equal(embed_dataset(model, ds, batch_size=8).image_emb, want)


def test_prefetch_thread_gives_the_same_batches_in_order(data):
    model = ConvModel()
    ds = open_dataset(str(data["ret"]))
    threads: set[str] = set()
    real = model.image_transform()

    def transform(image):
        threads.add(threading.current_thread().name)
        return real(image)

    model.image_transform = lambda train=False: transform
    plain = list(image_batches(model, ds, 4, 0, prefetch=0))
    assert threads == {threading.main_thread().name}
    threads.clear()
    ahead = list(image_batches(model, ds, 4, 0, prefetch=2))
    assert threads == {"clipkit-prefetch"}  # decoded beside the model, not in its thread
    assert [b["key"] for b in ahead] == [b["key"] for b in plain]
    assert [b["captions"] for b in ahead] == [b["captions"] for b in plain]
    for a, b in zip(ahead, plain, strict=True):
        assert torch.equal(a["image"], b["image"])


def test_prefetch_raises_the_readers_error_and_stops_when_closed():
    def broken():
        yield 1
        raise ValueError("bad shard")

    with pytest.raises(ValueError, match="bad shard"):
        list(embed_mod.prefetched(broken(), 2))
    before = threading.active_count()
    gen = embed_mod.prefetched(iter(range(1000)), 2)
    assert next(gen) == 0
    gen.close()  # the consumer leaves early: the thread ends
    assert threading.active_count() == before


@pytest.mark.parametrize("name", ["cls", "ret"])
def test_loader_workers_give_the_ordered_results_of_none(data, name):
    model = ConvModel()
    ds = open_dataset(str(data[name]))
    texts = name == "ret"
    none = embed_dataset(model, ds, batch_size=4, texts=texts)
    two = embed_dataset(model, ds, batch_size=4, num_workers=2, texts=texts)
    assert two.keys == none.keys
    torch.testing.assert_close(two.image_emb, none.image_emb, atol=1e-5, rtol=0)
    if texts:
        assert torch.equal(two.text_to_image, none.text_to_image)
        torch.testing.assert_close(two.text_emb, none.text_emb, atol=1e-6, rtol=0)
    else:
        assert torch.equal(two.labels, none.labels)


def test_prompts_are_encoded_once_per_model_and_class_names(data, tmp_path, monkeypatch):
    """Two zero-shot datasets with the same class names and prompts: one classifier, same scores."""
    entries = [
        {"name": "a", "task": "zeroshot", "path": str(data["cls"])},
        {"name": "b", "task": "zeroshot", "path": str(data["cls"]), "split": "test"},
        {"name": "c", "task": "zeroshot", "path": str(data["cls"]), "templates": ["{c}"]},
    ]
    model = ColorModel()
    calls: list[int] = []
    real = ColorModel.encode_text

    def counting(self, text, normalize=True):
        calls.append(len(text))
        return real(self, text, normalize)

    monkeypatch.setattr(ColorModel, "encode_text", counting)
    monkeypatch.setattr("clipkit.models.specs.load_model", lambda spec, device="cpu": model)
    model.name, model.pretrained = "color", ""
    opts = RunOptions(tmp_path / "out", batch_size=8, report=False)
    rows = run_suite(["color"], parse_suite({"name": "s", "datasets": entries}), opts, log=lambda _m: None)
    n_classes, n_prompts = (
        len(open_dataset(str(data["cls"])).classnames),
        len(open_dataset(str(data["cls"])).templates),
    )
    assert sum(calls) == n_classes * n_prompts + n_classes  # a and b share; c has its own prompts
    scores = {(r["dataset"], r["metric"]): r["value"] for r in rows}
    for metric in ("acc1", "mean_per_class_recall"):
        assert scores[("a", metric)] == scores[("b", metric)]

    # The oracle: each dataset alone, its prompts encoded for it.
    for entry in entries[:2]:
        name = entry["name"]
        alone = run_suite(
            ["color"], parse_suite({"name": "s", "datasets": [entry]}), opts, log=lambda _m: None
        )
        assert {r["metric"]: r["value"] for r in alone} == {m: v for (d, m), v in scores.items() if d == name}


TOWER = [
    "model.vision.name=timm:tf_efficientnet_lite0",
    "model.vision.weights=",
    "model.vision.image_size=32",
    "model.vision.locked=true",
    "model.text.name=open_clip:clipkit-tiny-ViT",
    "model.text.weights=",
    "model.text.context_length=16",
    "model.projection=linear",
    "model.embed_dim=24",
]


def test_locked_cnn_tower_cache_is_bit_identical_to_the_plain_pass(data, tmp_path):
    """tower_cache takes its features in image_inference's layout, as the uncached pass does."""
    cfg = load_config(None, TOWER)
    torch.manual_seed(0)
    ckpt.save(tmp_path / "run", 5, {"model": build_model(cfg.model).state_dict(), "config": to_dict(cfg)})
    # Zero-shot only: the layout is the point here (test_eval_tower_cache.py covers retrieval).
    suite = parse_suite(
        {"name": "t", "datasets": [{"name": "cls", "task": "zeroshot", "path": str(data["cls"])}]}
    )

    def scores(cache: Path | None) -> dict:
        opts = RunOptions(tmp_path / "out", batch_size=8, cache_dir=cache, report=False)
        rows = run_suite([str(tmp_path / "run")], suite, opts, log=lambda _m: None)
        return {(r["dataset"], r["metric"]): r["value"] for r in rows}

    plain = scores(None)
    assert scores(tmp_path / "cache") == plain  # miss: computed and stored
    assert list((tmp_path / "cache" / "tower").glob("*.pt"))
    assert scores(tmp_path / "cache") == plain  # hit: read back


def test_bf16_is_native_only_where_the_cpu_says_so(monkeypatch):
    assert bf16_support("cpu", flags={"avx2", "avx512_bf16"}) == "CPU flags avx512_bf16"
    assert bf16_support("cpu", flags={"amx_bf16"}) == "CPU flags amx_bf16"
    assert bf16_support("cpu", flags={"avx2", "avx512f"}) is None
    monkeypatch.setattr(embed_mod, "cpu_flags", lambda: {"avx2"})
    with pytest.raises(ClipkitError, match="no native bf16"):
        check_precision("bf16", "cpu")
    check_precision("fp32", "cpu")
    with pytest.raises(ClipkitError, match="unknown inference precision"):
        check_precision("fp16", "cpu")


def test_cli_refuses_bf16_without_native_support(data, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(embed_mod, "cpu_flags", lambda: {"avx2"})
    args = ["eval", "zeroshot", "--model", "x.yaml", "--dataset", str(data["cls"]), "--precision", "bf16"]
    assert clipkit_main([*args, "--device", "cpu", "--output", str(tmp_path)]) == ClipkitError.exit_code
    assert "no native bf16" in capsys.readouterr().err


def test_bf16_autocasts_the_image_side_only_when_asked(data):
    model = ConvModel()
    seen: list[torch.dtype] = []
    model.head.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    x = torch.randn(2, 3, 32, 32)
    with eval_mode(model):
        for precision in ("fp32", "bf16"):
            with image_inference(model, precision) as prep:
                model.encode_image(prep(x))
    assert seen == [torch.float32, torch.bfloat16]
    assert runner_mod.RunOptions(Path(".")).precision == "fp32"  # identical scores by default


def test_cpu_lanes_give_the_one_pass_embeddings_bit_for_bit(tmp_path):
    """With 2 torch threads a convolutional image side runs LANE_ROWS images per call in 2 lanes
    of one thread each; the embeddings equal the one-lane pass (1 thread, whole batches) bit for
    bit, since oneDNN's batch kernels give each image the same output at any batch >= 16. A batch
    of 40 splits 16 + 24 (no chunk under 16); the last batch of 30 runs whole."""
    from clipkit.evaluation import embed as eval_embed

    ds = open_dataset(str(wds_classification(tmp_path / "cls", n=70, per_shard=20)))
    model = ConvModel()
    lanes_seen: list[tuple[str, int]] = []
    model.trunk.register_forward_pre_hook(
        lambda _m, args: lanes_seen.append((threading.current_thread().name, len(args[0])))
    )
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = embed_dataset(model, ds, batch_size=40)
        assert {name for name, _ in lanes_seen} == {threading.main_thread().name}
        assert sorted(n for _, n in lanes_seen) == [30, 40]
        lanes_seen.clear()
        torch.set_num_threads(2)
        two = embed_dataset(model, ds, batch_size=40)
        assert torch.get_num_threads() == 2  # put back after the lanes
    finally:
        torch.set_num_threads(before)
    assert {name.split("_")[0] for name, _ in lanes_seen} == {"clipkit-lane"}
    assert sorted(n for _, n in lanes_seen) == [16, 24, 30]
    assert eval_embed.LANE_ROWS == 16
    assert two.keys == one.keys
    assert torch.equal(two.image_emb, one.image_emb)
    assert torch.equal(two.labels, one.labels)


def test_tower_cache_and_training_eval_features_run_in_lanes_bit_for_bit(tmp_path):
    """The eval tower cache's fill and the training-time evaluation's feature pass run a CNN tower
    in lanes too (``clipkit.evaluation.embed.image_rows``): with 2 torch threads the tower sees
    chunks of 16 + 24 from a batch of 40 on ``clipkit-lane`` threads, and the features equal the
    one-thread pass's bit for bit."""
    from clipkit.evaluation import tower_cache
    from clipkit.evaluation.distributed import Ranks
    from clipkit.training.evaluate import feature_set

    cfg = load_config(None, TOWER)
    torch.manual_seed(0)
    model = build_model(cfg.model)
    ds = open_dataset(str(wds_classification(tmp_path / "cls", n=70, per_shard=20)))
    seen: list[tuple[str, int]] = []
    model.vision.register_forward_pre_hook(
        lambda _m, args: seen.append((threading.current_thread().name, len(args[0])))
    )

    def passes() -> tuple[dict, list]:
        cached = tower_cache._compute(model, model, ds, 40, 0)
        features = feature_set(model, ds, Ranks(), 40, 0, "t")
        return cached, [(s["key"], s["image"]) for s in features.samples]

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one, one_set = passes()
        assert {name for name, _ in seen} == {threading.main_thread().name}
        seen.clear()
        torch.set_num_threads(2)
        two, two_set = passes()
    finally:
        torch.set_num_threads(before)
    assert {name.split("_")[0] for name, _ in seen} == {"clipkit-lane"}
    assert sorted(n for _, n in seen) == [16, 16, 24, 24, 30, 30]  # both passes: 40 = 16 + 24, then 30
    assert two["keys"] == one["keys"] and torch.equal(two["features"], one["features"])
    assert [k for k, _ in two_set] == [k for k, _ in one_set]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(two_set, one_set, strict=True))
