"""Oxygen desktop icons -> an out-of-domain retrieval set: icon images and their concept names.

Source: the Debian package ``oxygen-icon-theme`` (KDE's Oxygen icons, LGPL-3; ~38 MB
installed; ``make demo`` / ``make test`` install it), its 48x48 PNGs under
``/usr/share/icons/oxygen/base/48x48/<context>/<name>.png``. Icon names follow the
freedesktop naming spec, concept words joined by dashes ("camera-photo", "weather-storm",
"face-smile-big", "battery-charging-low"); the caption is the name with dashes and underscores
as spaces ("camera photo"). The contexts ``apps`` (product names: "kmail", "amarok") and
``mimetypes`` (file types: "application-x-rar") are left out: their names do not describe the
picture. Symbolic links (aliases of another icon) are skipped and each caption is kept once
(the first in path order), so every caption names one image.

Desktop icons are glossy, shaded 3-D renderings, unlike flat emoji or line clip art, and no
training source holds them. Images are composited on white (as ``clipkit.data.decode`` does
for training). Layout: ``data_tools/ood.py`` (task retrieval, one caption per image).

    clipkit data build ood-icons --out data/ood_icons
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterator
from pathlib import Path

from PIL import Image

from clipkit.data.builders import BUILDERS
from data_tools.common import completed_build
from data_tools.ood import on_white, png, write_test_split

ROOT = Path("/usr/share/icons/oxygen/base")
SIZE = "48x48"
CONTEXTS = ("actions", "animations", "categories", "devices", "emblems", "emotes", "places", "status")


def caption_of(name: str) -> str:
    """'camera-photo' -> 'camera photo' (dashes and underscores become single spaces)."""
    return " ".join(w for w in re.split(r"[-_\s]+", name) if w)


def icon_pairs(root: str | Path = ROOT, size: str = SIZE) -> list[tuple[str, Path]]:
    """(caption, png path) of every real (non-link) icon of ``CONTEXTS``, one per caption,
    in path order; a missing theme raises with the install command."""
    base = Path(root) / size
    if not base.is_dir():
        raise FileNotFoundError(
            f"{base} not found: the Oxygen icons come from Debian: apt-get install oxygen-icon-theme "
            "(make test / make demo install it)"
        )
    seen: dict[str, Path] = {}
    for context in CONTEXTS:
        for path in sorted((base / context).glob("*.png")):
            caption = caption_of(path.stem)
            if not path.is_symlink() and caption and caption not in seen:
                seen[caption] = path
    return list(seen.items())


def _samples(pairs: list[tuple[str, Path]]) -> Iterator[dict]:
    for i, (caption, path) in enumerate(pairs):
        with Image.open(path) as img:
            image = on_white(img)
        key = re.sub(r"[^A-Za-z0-9_-]", "_", path.stem)  # '.' would split the webdataset key
        yield {"__key__": f"{i:04d}_{key}", "png": png(image), "txt": caption}


@BUILDERS.register("ood-icons")
def build(out_dir: str | Path, shard_size: int = 1000, root: str | Path = ROOT) -> dict[str, int]:
    """Write the retrieval set (one caption per image); a complete identical build is kept.
    Returns ``{"test", "test_shards"}``."""
    out = Path(out_dir)
    params = {"shard_size": shard_size, "root": str(root), "size": SIZE, "contexts": list(CONTEXTS)}
    if (done := completed_build(out, params, ("test",))) is not None:
        return done
    return write_test_split(out, _samples(icon_pairs(root)), params, shard_size)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="data/ood_icons", help="output folder (default: data/ood_icons)")
    parser.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    args = parser.parse_args(argv)
    print(f"ood-icons: {build(args.out, args.shard_size)} under {args.out}")


if __name__ == "__main__":
    main()
