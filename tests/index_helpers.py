"""A tiny colour model, coloured-square collections and clustered vectors for the index tests.

``ColorModel`` implements the four DualEncoder methods the index code uses. An image embeds
as its mean colour, a text as the first CSS colour name in it ("a red square" -> red), both
through the same fixed random projection, so "red" finds the red squares: a model whose
right answers are known.
"""

from __future__ import annotations

import json
import tarfile
from io import BytesIO
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageColor

from clipkit.index.store import finish, part_name, write_part

COLORS = ["red", "green", "blue", "yellow", "purple", "orange", "cyan", "magenta", "black", "white"]


class ColorModel(torch.nn.Module):
    def __init__(self, dim: int = 16, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.proj = torch.nn.Parameter(torch.randn(4, dim, generator=g), requires_grad=False)  # (rgb+1, D)

    def image_transform(self, train: bool):
        def transform(image: Image.Image) -> torch.Tensor:
            arr = np.asarray(image.convert("RGB").resize((8, 8)), dtype=np.float32) / 255
            return torch.from_numpy(arr).permute(2, 0, 1)  # (3, 8, 8)

        return transform

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        rows = []
        for text in texts:
            word = next((w for w in text.lower().split() if w in COLORS), None)
            rows.append(ImageColor.getrgb(word) if word else (128, 128, 128))
        return torch.tensor(rows, dtype=torch.long)  # (B, 3) "tokens": the colour

    def _embed(self, rgb: torch.Tensor, normalize: bool) -> torch.Tensor:
        x = torch.cat([rgb - 0.5, torch.full((len(rgb), 1), 0.3)], dim=1) @ self.proj  # (B, D)
        return torch.nn.functional.normalize(x, dim=-1) if normalize else x

    def encode_text(self, text: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        return self._embed(text.float() / 255, normalize)

    def encode_image(self, image=None, image_features=None, normalize: bool = True) -> torch.Tensor:
        return self._embed(image.mean(dim=(2, 3)), normalize)  # mean colour (B, 3)


def color_model() -> ColorModel:
    return ColorModel(16)


def wide_model() -> ColorModel:
    return ColorModel(24)


def square_png(color: str, shade: float = 1.0, size: int = 12) -> bytes:
    rgb = tuple(int(c * shade) for c in ImageColor.getrgb(color))
    buf = BytesIO()
    Image.new("RGB", (size, size), rgb).save(buf, "PNG")
    return buf.getvalue()


def write_squares(folder: Path, shades: int = 3) -> list[str]:
    """``<colour>_<i>.png`` + caption .txt files; returns the keys, sorted."""
    folder.mkdir(parents=True, exist_ok=True)
    keys = []
    for color in COLORS:
        for i in range(shades):
            key = f"{color}_{i}"
            (folder / f"{key}.png").write_bytes(square_png(color, 1.0 - 0.15 * i))
            (folder / f"{key}.txt").write_text(f"a {color} square, shade {i}")
            keys.append(key)
    return sorted(keys)


def write_square_shards(folder: Path, per_shard: int = 8, bad: bool = True) -> list[Path]:
    """Webdataset tars of coloured squares (png, txt, json url, idx); one undecodable image."""
    folder.mkdir(parents=True, exist_ok=True)
    samples = [(f"{c}{i}", c, i) for c in COLORS for i in range(2)]
    shards = []
    for s in range(0, len(samples), per_shard):
        path = folder / f"shard-{s // per_shard:06d}.tar"
        with tarfile.open(path, "w") as tar:
            for j, (key, color, i) in enumerate(samples[s : s + per_shard]):
                png = b"not an image" if bad and s + j == 3 else square_png(color, 1.0 - 0.2 * i)
                members = {
                    "png": png,
                    "txt": f"a {color} square".encode(),
                    "json": json.dumps({"url": f"https://example.com/{key}.png"}).encode(),
                    "idx": str(s + j).encode(),
                }
                for ext, data in members.items():
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, BytesIO(data))
        shards.append(path)
    return shards


def clustered(n: int, d: int, clusters: int = 50, noise: float = 0.8, seed: int = 0) -> np.ndarray:
    """(n, d) float32 unit vectors around uneven cluster centres; noise of norm ~``noise``."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, d))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    sizes = rng.zipf(1.5, clusters).astype(np.float64)
    which = rng.choice(clusters, n, p=sizes / sizes.sum())
    x = centres[which] + noise * rng.standard_normal((n, d)) / np.sqrt(d)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def write_vectors(root: Path, x: np.ndarray, part_rows: int, dtype=np.float32, key_prefix: str = "v") -> Path:
    """An embedding export of ``x`` (keys ``v000000``...) without a model."""
    root.mkdir(parents=True, exist_ok=True)
    names = []
    for p, start in enumerate(range(0, len(x), part_rows)):
        chunk = x[start : start + part_rows]
        ids = range(start, start + len(chunk))
        meta = {
            "key": [f"{key_prefix}{i:06d}" for i in ids],
            "idx": list(ids),
            "caption": [f"vector {i}" for i in ids],
            "source": [""] * len(chunk),
            "shard": ["synthetic"] * len(chunk),
            "offset": [i - start for i in ids],
        }
        write_part(root, part_name(p), chunk.astype(dtype), meta)
        names.append(part_name(p))
    finish(root, {"model": "synthetic", "modality": "image", "dtype": np.dtype(dtype).name}, names)
    return root
