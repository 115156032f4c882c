"""Monochrome pictograms named by their concepts -> train / val webdataset shards.

Source: three icon sets of the Iconify project, from the npm registry (``npm pack``, pinned):

| package | icons | licence | what it draws |
|---|---|---|---|
| ``@iconify-json/game-icons`` 1.2.4 | 4,134 | CC BY 3.0 | game-icons.net: solid silhouettes of animals, tools, weapons, creatures, buildings |
| ``@iconify-json/fluent-emoji-high-contrast`` 1.2.6 | 1,594 | MIT | Microsoft's Fluent emoji as one-colour glyphs |
| ``@iconify-json/emojione-monotone`` 1.2.1 | 1,403 | CC BY 4.0 | EmojiOne 2 as one-colour glyphs |

Each icon is an SVG body (``fill="currentColor"``); ``resvg-py`` renders it at 72 px (the emoji's
size), fitted to 60 px and centred. An icon has one colour and no palette, so each is drawn once in
one of two polarities, chosen by a hash of its key: light on dark or dark on light. Caption = the
icon's name with dashes as spaces ("polar-bear" -> "polar bear").

Why: neither emoji nor clip art teaches the image->text map what a thing's bare shape is called.
These sets name ~7,000 solid shapes, among them animals in side view, the way silhouettes and
pictograms show them.

Decontamination, so that the evaluation sets stay held out (the dropped count is in build_info.json):
- an icon whose caption names a held-out emoji (a caption of the emoji build's val split,
  compared as lower-case words, also with "face" left out: "cat face" = "cat") is dropped, so
  emoji val retrieval is not learnt from another designer's drawing of the same emoji;
- an icon whose caption holds a digit or a number word (zero ... nine, keycap, digit, number,
  numeric) is dropped, as ``ood_digits`` is zero-shot over the ten digits.

Output: ``<out>/{train,val}/shard-NNNNNN.tar`` (``<key>.png`` RGB, ``<key>.txt``) + ``sizes.json``,
key = ``<set>__<icon name>``; the split is a hash of the key (~10% val), shards in hash order.
The fetched packages are kept under ``<out>/packages`` (``--packages DIR`` reads them from DIR
instead, e.g. on a machine without npm).

    clipkit data build glyphs --out data/glyphs
    # recipe: data.train=data/emoji/train::data/glyphs/train
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Iterable
from pathlib import Path

from PIL import Image

from clipkit.data.atomic import atomic_write_text
from clipkit.data.builders import BUILDERS
from data_tools.build_emoji import emoji_pairs
from data_tools.common import BUILD_INFO, completed_build, finish_build, key_hash, start_build, write_split

# (npm package, version): pinned, so a build is the same on every machine.
PACKAGES = {
    "game-icons": ("@iconify-json/game-icons", "1.2.4"),
    "fluent-emoji-high-contrast": ("@iconify-json/fluent-emoji-high-contrast", "1.2.6"),
    "emojione-monotone": ("@iconify-json/emojione-monotone", "1.2.1"),
}
SIZE = 72  # canvas, as the emoji
GLYPH = 60  # the icon's longer side on it
NUMBER_WORDS = {
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
    "keycap", "digit", "number", "numeric",
}  # fmt: skip


def tarball_name(package: str, version: str) -> str:
    """npm's file name for a packed package: '@iconify-json/mdi', '1.2.3' -> 'iconify-json-mdi-1.2.3.tgz'."""
    return f"{package.lstrip('@').replace('/', '-')}-{version}.tgz"


def fetch_packages(dest: Path, sets: Iterable[str] = PACKAGES) -> dict[str, Path]:
    """{set: tarball} for each icon set, packed with ``npm pack`` into ``dest`` when missing.
    A tarball appears whole or not at all (packed in a temporary folder, then renamed)."""
    dest.mkdir(parents=True, exist_ok=True)
    found = {}
    for name in sets:
        package, version = PACKAGES[name]
        path = dest / tarball_name(package, version)
        if not path.is_file():
            npm = shutil.which("npm")
            if npm is None:
                raise FileNotFoundError(
                    f"{path} is missing and npm is not installed: the glyph sets come from the npm "
                    "registry. Install Node.js's npm (apt-get install npm; make demo does) or pack "
                    f"{package}@{version} elsewhere and pass its folder with --packages"
                )
            with tempfile.TemporaryDirectory(dir=dest) as tmp:
                # npm runs in the temporary folder and packs into it: "." (a relative dest would be
                # read by npm against that folder); errors only, so a failure says why
                done = subprocess.run(
                    [npm, "pack", f"{package}@{version}", "--pack-destination", ".", "--loglevel=error"],
                    check=False, capture_output=True, text=True, cwd=tmp,
                )  # fmt: skip
                packed = Path(tmp) / tarball_name(package, version)
                if done.returncode != 0 or not packed.is_file():
                    raise RuntimeError(
                        f"npm pack {package}@{version} failed (exit {done.returncode}): "
                        f"{(done.stderr or done.stdout).strip()[-500:]}; is the npm registry reachable?"
                    )
                os.replace(packed, path)
        found[name] = path
    return found


def read_icon_set(tarball: Path) -> dict:
    """The Iconify JSON (``package/icons.json``) inside an npm tarball."""
    try:
        with tarfile.open(tarball, "r:gz") as tar:
            member = tar.extractfile("package/icons.json")
            if member is None:
                raise KeyError("package/icons.json")
            return json.load(member)
    except (tarfile.TarError, KeyError, OSError, EOFError, json.JSONDecodeError) as e:
        raise ValueError(
            f"{tarball}: not an Iconify icon-set package ({type(e).__name__}: {e}); delete it and "
            "build again to fetch it anew"
        ) from e


def words(text: str) -> list[str]:
    """Lower-case words of a name or caption: 'Cat-Face: smiling' -> ['cat', 'face', 'smiling']."""
    return [w for w in re.split(r"[^a-z0-9]+", text.lower()) if w]


def caption_of(name: str) -> str:
    """'polar-bear' -> 'polar bear'."""
    return " ".join(words(name))


def _forms(caption: str) -> set[tuple[str, ...]]:
    """The forms a caption is compared in: its words, and its words without 'face'."""
    w = words(caption)
    return {tuple(w), tuple(x for x in w if x != "face")}


def held_out_forms(captions: Iterable[str]) -> set[tuple[str, ...]]:
    """The forms under which an icon's caption counts as one of ``captions``."""
    return set().union(*(_forms(c) for c in captions))


def dropped(caption: str, held_out: set[tuple[str, ...]]) -> str | None:
    """Why an icon is left out ("held-out emoji", "number"), or None to keep it."""
    if any(c.isdigit() for c in caption) or NUMBER_WORDS.intersection(words(caption)):
        return "number"
    if _forms(caption) & held_out:
        return "held-out emoji"
    return None


def icon_svg(icon_set: dict, name: str) -> tuple[str, float, float]:
    """(SVG markup, width, height) of one icon, drawn in black (the mask)."""
    icon = icon_set["icons"][name]
    width = float(icon.get("width", icon_set.get("width", 16)))
    height = float(icon.get("height", icon_set.get("height", 16)))
    left, top = icon.get("left", icon_set.get("left", 0)), icon.get("top", icon_set.get("top", 0))
    body = icon["body"].replace("currentColor", "#000000")
    svg = (
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="{left} {top} {width} {height}" '
        f'width="{width}" height="{height}">{body}</svg>'
    )
    return svg, width, height


def render(svg: str, width: float, height: float, light_on_dark: bool) -> Image.Image:
    """The icon, its longer side ``GLYPH`` px, centred on a ``SIZE`` px RGB canvas in one polarity."""
    import resvg_py

    scale = GLYPH / max(width, height)
    w, h = max(1, round(width * scale)), max(1, round(height * scale))
    data = bytes(resvg_py.svg_to_bytes(svg_string=svg, width=w, height=h))
    with Image.open(io.BytesIO(data)) as img:
        alpha = img.convert("RGBA").getchannel("A")  # ink where the icon is
    ink, paper = (255, 0) if light_on_dark else (0, 255)
    canvas = Image.new("L", (SIZE, SIZE), paper)
    canvas.paste(Image.new("L", (w, h), ink), ((SIZE - w) // 2, (SIZE - h) // 2), alpha)
    return canvas.convert("RGB")


def glyph_samples(
    tarballs: dict[str, Path], held_out: set[tuple[str, ...]]
) -> tuple[list[tuple[str, str, str, dict]], dict[str, int]]:
    """([(key, set, icon name, icon set)], {reason: count dropped}); one sample per kept icon
    (aliases, which are other names of an icon, are not read)."""
    samples, drops = [], {"number": 0, "held-out emoji": 0}
    for set_name, tarball in tarballs.items():
        icon_set = read_icon_set(tarball)
        for name in sorted(icon_set["icons"]):
            if icon_set["icons"][name].get("hidden"):
                continue
            why = dropped(caption_of(name), held_out)
            if why:
                drops[why] += 1
                continue
            samples.append((f"{set_name}__{name}", set_name, name, icon_set))
    return samples, drops


def emoji_val_captions(emoji_dir: Path | None) -> list[str]:
    """The captions of the emoji build's val split: its split rule (``data_tools.build_emoji``)
    over the twemoji files, with the val fraction that build used."""
    fraction = build_emoji_val_fraction(emoji_dir)
    return [c for key, _, c in emoji_pairs() if key_hash("split:" + key) < fraction]


def build_emoji_val_fraction(emoji_dir: Path | None) -> float:
    """The val fraction the emoji build used (its build_info.json), else its default."""
    if emoji_dir is not None:
        try:
            return float(json.loads((emoji_dir / BUILD_INFO).read_text())["params"]["val_fraction"])
        except (OSError, KeyError, ValueError):
            pass
    return 0.1


@BUILDERS.register("glyphs")
def build(
    out_dir: str | Path,
    val_fraction: float = 0.1,
    shard_size: int = 1000,
    packages: str | Path | None = None,
    emoji_dir: str | Path | None = "data/emoji",
) -> dict[str, int]:
    """Write ``<out_dir>/{train,val}/shard-*.tar``; a complete identical build is kept.
    Returns ``{"train", "val", "train_shards", "val_shards", "dropped_number", "dropped_held_out_emoji"}``."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    out = Path(out_dir)
    emoji = Path(emoji_dir) if emoji_dir else None
    params = {
        "val_fraction": val_fraction, "shard_size": shard_size, "size": SIZE, "glyph": GLYPH,
        "packages": {k: f"{p}@{v}" for k, (p, v) in PACKAGES.items()},
        "emoji_val_fraction": build_emoji_val_fraction(emoji),
    }  # fmt: skip
    if (done := completed_build(out, params, ("train", "val"))) is not None:
        return done
    start_build(out)
    tarballs = fetch_packages(Path(packages) if packages else out / "packages")
    samples, drops = glyph_samples(tarballs, held_out_forms(emoji_val_captions(emoji)))
    samples.sort(key=lambda s: key_hash(s[0]))  # hash order mixes the sets in every shard
    splits = {
        "val": [s for s in samples if key_hash("split:" + s[0]) < val_fraction],
        "train": [s for s in samples if key_hash("split:" + s[0]) >= val_fraction],
    }
    counts = {"dropped_number": drops["number"], "dropped_held_out_emoji": drops["held-out emoji"]}
    for split, rows in splits.items():
        counts[split] = len(rows)
        counts[f"{split}_shards"] = write_split(
            out / split,
            [(key, (set_name, name, icon_set), caption_of(name)) for key, set_name, name, icon_set in rows],
            shard_size,
            image_bytes=_png_of,
        )
    atomic_write_text(out / "dataset_type.txt", "retrieval\n")
    finish_build(out, params, counts)
    return counts


def _png_of(key: str, source: tuple[str, str, dict]) -> bytes:
    _, name, icon_set = source
    image = render(*icon_svg(icon_set, name), light_on_dark=key_hash("polarity:" + key) < 0.5)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="data/glyphs", help="output folder (default: data/glyphs)")
    parser.add_argument("--val-fraction", type=float, default=0.1)
    parser.add_argument("--shard-size", type=int, default=1000, help="max samples per shard")
    parser.add_argument(
        "--packages", default=None, help="folder with the packed npm tarballs (default: <out>/packages)"
    )
    parser.add_argument("--emoji", default="data/emoji", help="the emoji build whose val split is held out")
    args = parser.parse_args(argv)
    counts = build(args.out, args.val_fraction, args.shard_size, args.packages, args.emoji)
    print(f"glyphs: {counts} under {args.out}")


if __name__ == "__main__":
    main()
