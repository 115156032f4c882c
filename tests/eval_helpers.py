"""Shared pieces of the evaluation tests: a dual encoder whose answers are known, tiny datasets
in every supported layout, and tiny open_clip / Hugging Face models built offline."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from clipkit.evaluation.datasets import write_clip_benchmark_wds

WORDS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}
TEMPLATES = ["a photo of {c}.", "a {c} thing"]


def to_tensor(im: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1)  # (3, H, W)


class ColorModel(nn.Module):
    """A dual encoder with D = 4: an image is its mean RGB; a text is the colour it names
    ("red", "green", "blue" or "rgb R G B"), plus a marker axis for "... thing" prompts."""

    def __init__(self) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.ones(()))
        self.image_calls = 0
        self.images_seen = 0

    def image_transform(self, train: bool = False):
        return to_tensor

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        rows = []
        for t in texts:
            numbers = [int(x) for x in re.findall(r"\d+", t)]
            rgb = numbers[:3] if len(numbers) >= 3 else next(v for w, v in WORDS.items() if w in t)
            rows.append([*rgb, int(t.endswith("thing"))])
        return torch.tensor(rows, dtype=torch.long)  # (B, 4)

    def encode_image(self, image=None, image_features=None, normalize=True):
        self.image_calls += 1
        self.images_seen += image.shape[0]
        x = F.pad(image.mean(dim=(2, 3)), (0, 1)) * self.gain  # (B, 4)
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text(self, text, normalize=True):
        rgb, marker = text[:, :3].float(), text[:, 3:].float()
        x = torch.where(
            marker.bool(), torch.cat([rgb / 255, marker], 1), torch.cat([10 * rgb / 255, 0 * marker], 1)
        )
        return F.normalize(x, dim=-1) if normalize else x

    def fingerprint(self) -> str:
        return f"color-{float(self.gain.detach()):.6f}"


def square(rgb, size: int = 6) -> Image.Image:
    return Image.new("RGB", (size, size), tuple(int(c) for c in rgb))


def noisy_colors(n: int, seed: int = 0) -> list[tuple[tuple[int, int, int], int]]:
    """n (colour, label) pairs: each a primary colour plus noise, label = which primary."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        label = i % 3
        base = np.array(list(WORDS.values())[label], dtype=float)
        rgb = np.clip(base * 0.7 + rng.integers(0, 80, 3), 0, 255).astype(int)
        out.append((tuple(rgb), label))
    return out


def wds_classification(root: Path, n: int = 30, per_shard: int = 7, seed: int = 0) -> Path:
    samples = [
        {"image": square(c), "label": y, "key": f"s{i:04d}"} for i, (c, y) in enumerate(noisy_colors(n, seed))
    ]
    write_clip_benchmark_wds(root, samples, list(WORDS), TEMPLATES, samples_per_shard=per_shard)
    return root


def wds_retrieval(root: Path, n: int = 20, per_shard: int = 6, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    samples = []
    for i in range(n):
        rgb = rng.integers(0, 256, 3)
        near = np.clip(rgb + rng.integers(-40, 40, 3), 0, 255)
        caps = [f"rgb {rgb[0]} {rgb[1]} {rgb[2]}", f"rgb {near[0]} {near[1]} {near[2]}"][: 1 + i % 2]
        samples.append({"image": square(rgb), "captions": caps, "key": f"r{i:04d}"})
    write_clip_benchmark_wds(root, samples, samples_per_shard=per_shard)
    return root


def image_folder(root: Path, n: int = 24, seed: int = 0) -> Path:
    for i, (c, y) in enumerate(noisy_colors(n, seed)):
        folder = root / list(WORDS)[y]
        folder.mkdir(parents=True, exist_ok=True)
        square(c).save(folder / f"img{i:03d}.png")
    return root


def manifest(root: Path, retrieval: bool = False, n: int = 12) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (c, y) in enumerate(noisy_colors(n)):
        name = f"images/m{i:03d}.png"
        (root / "images").mkdir(exist_ok=True)
        square(c).save(root / name)
        if retrieval:
            rows += [{"image": name, "caption": f"rgb {c[0]} {c[1]} {c[2]}"}]
            if i % 2:
                rows += [{"image": name, "caption": "rgb 0 0 0"}]
        else:
            rows += [{"image": name, "class": list(WORDS)[y], "split": "test" if i % 4 == 0 else "train"}]
    path = root / "manifest.csv"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


# ----------------------------------------------------------------------------- real model families


def tiny_open_clip_weights(path: Path, seed: int = 0, config: str = "clipkit-tiny-ViT") -> Path:
    import open_clip

    from clipkit.models.specs import CLIPKIT_CONFIGS

    open_clip.add_model_config(CLIPKIT_CONFIGS)
    torch.manual_seed(seed)
    torch.save(open_clip.create_model(config).state_dict(), path)
    return path


def tiny_clip_tokenizer():
    """A byte-level BPE CLIP tokenizer with 518 tokens, built offline (no vocabulary download)."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    merges = [("r", "e"), ("re", "d</w>")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges)


def tiny_hf_model(folder: Path, kind: str = "clip", seed: int = 0) -> Path:
    """A random ``CLIPModel`` or ``SiglipModel`` with tokenizer and image processor, saved offline."""
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        SiglipConfig,
        SiglipImageProcessor,
        SiglipModel,
    )

    tok = tiny_clip_tokenizer()
    ids = {
        "pad_token_id": tok.pad_token_id,
        "eos_token_id": tok.eos_token_id,
        "bos_token_id": tok.bos_token_id,
    }
    text = dict(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=16,
        **ids,
    )
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
    vision.update(image_size=32, patch_size=8)
    torch.manual_seed(seed)
    if kind == "clip":
        model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
        proc = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    else:
        model = SiglipModel(SiglipConfig(text_config=text, vision_config=vision))
        proc = SiglipImageProcessor(size={"height": 32, "width": 32})
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    proc.save_pretrained(folder)
    return folder


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())
