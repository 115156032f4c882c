"""The glyph source (data_tools/build_glyphs.py): Iconify icon sets packed from npm, rendered as
one-colour pictograms, decontaminated against the held-out evaluation sets. The tests build
from small Iconify packages made here and a stand-in ``npm``; no registry is reached."""

from __future__ import annotations

import io
import json
import os
import stat
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from data_tools import build_emoji, build_glyphs
from data_tools.common import key_hash

SQUARE = '<path fill="currentColor" d="M4 4h8v8H4z"/>'  # the middle quarter of a 16-unit box


def iconify_tarball(path: Path, icons: dict[str, dict], width: int = 16, height: int = 16) -> Path:
    """An npm tarball holding ``package/icons.json`` in Iconify's format."""
    data = json.dumps({"prefix": "t", "icons": icons, "width": width, "height": height}).encode()
    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo("package/icons.json")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return path


def packages_dir(tmp_path: Path, sets: dict[str, dict[str, dict]]) -> Path:
    """A --packages folder with one tarball per set of PACKAGES, named as npm names them."""
    folder = tmp_path / "packages"
    folder.mkdir(exist_ok=True)
    for name, (package, version) in build_glyphs.PACKAGES.items():
        iconify_tarball(folder / build_glyphs.tarball_name(package, version), sets.get(name, {}))
    return folder


def read_split(folder: Path) -> dict[str, tuple[str, np.ndarray]]:
    shards = sorted(str(p) for p in folder.glob("shard-*.tar"))
    out = {}
    for sample in wds.WebDataset(shards, shardshuffle=False, empty_check=False):
        image = np.asarray(Image.open(io.BytesIO(sample["png"])).convert("RGB"))
        out[sample["__key__"]] = (sample["txt"].decode(), image)
    return out


def test_captions_are_the_names_words():
    assert build_glyphs.caption_of("polar-bear") == "polar bear"
    assert build_glyphs.caption_of("Cat-Face--smiling") == "cat face smiling"
    assert (
        build_glyphs.tarball_name("@iconify-json/game-icons", "1.2.4") == "iconify-json-game-icons-1.2.4.tgz"
    )


def test_numbers_and_held_out_emoji_are_dropped():
    held = build_glyphs.held_out_forms(["cat face", "grinning squinting face", "flag: Japan"])
    assert build_glyphs.dropped("cat", held) == "held-out emoji"  # 'cat face' without 'face'
    assert build_glyphs.dropped("cat face", held) == "held-out emoji"
    assert build_glyphs.dropped("grinning squinting", held) == "held-out emoji"
    assert build_glyphs.dropped("flag japan", held) == "held-out emoji"
    assert build_glyphs.dropped("cat with wry smile", held) is None
    assert build_glyphs.dropped("dice six faces one", held) == "number"
    assert build_glyphs.dropped("keycap asterisk", held) == "number"
    assert build_glyphs.dropped("rank 3", held) == "number"
    assert build_glyphs.dropped("3d glasses", held) == "number"
    assert build_glyphs.dropped("phone", held) is None  # a number word inside a word does not count
    assert build_glyphs.dropped("horse head", held) is None


@pytest.mark.parametrize("light_on_dark", [True, False])
def test_render_centres_the_icon_in_one_polarity(light_on_dark):
    svg = build_glyphs.icon_svg({"icons": {"sq": {"body": SQUARE}}, "width": 16, "height": 16}, "sq")
    image = np.asarray(build_glyphs.render(*svg, light_on_dark=light_on_dark).convert("L"))
    assert image.shape == (build_glyphs.SIZE, build_glyphs.SIZE)
    ink, paper = (255, 0) if light_on_dark else (0, 255)
    # the 16-unit box is drawn 60 px wide from (6, 6): the square covers 21..51 of it
    assert image[36, 36] == ink and image[6:66, 6:66][14, 14] == paper
    assert image[0, 0] == paper and image[71, 71] == paper
    inked = np.argwhere(image == ink)
    assert inked.min(axis=0).tolist() == [21, 21] and inked.max(axis=0).tolist() == [50, 50]


def test_render_fits_a_wide_icon_by_its_longer_side():
    icon_set = {
        "icons": {"bar": {"body": '<path fill="currentColor" d="M0 0h32v16H0z"/>'}},
        "width": 32,
        "height": 16,
    }
    image = np.asarray(
        build_glyphs.render(*build_glyphs.icon_svg(icon_set, "bar"), light_on_dark=True).convert("L")
    )
    inked = np.argwhere(image > 127)
    assert inked.min(axis=0).tolist() == [21, 6] and inked.max(axis=0).tolist() == [50, 65]


def test_build_writes_deterministic_decontaminated_splits(tmp_path):
    val_caption = next(c for k, _, c in build_emoji.emoji_pairs() if key_hash("split:" + k) < 0.1)
    names = [f"thing-{w}" for w in "abcdefghijklmnopqrstuvwxyz"] + ["horse-head", "elephant"]
    sets = {
        "game-icons": {n: {"body": SQUARE} for n in names} | {"dice-six-faces-one": {"body": SQUARE}},
        "fluent-emoji-high-contrast": {
            val_caption.replace(" ", "-"): {"body": SQUARE},
            "zebra": {"body": SQUARE},
        },
        "emojione-monotone": {"gone": {"body": SQUARE, "hidden": True}, "keycap-5": {"body": SQUARE}},
    }
    folder = packages_dir(tmp_path, sets)
    counts = build_glyphs.build(tmp_path / "out", packages=folder, shard_size=10)
    assert counts["dropped_number"] == 2 and counts["dropped_held_out_emoji"] == 1
    assert counts["train"] + counts["val"] == len(names) + 1
    train, val = read_split(tmp_path / "out" / "train"), read_split(tmp_path / "out" / "val")
    assert len(train) == counts["train"] and len(val) == counts["val"] and not set(train) & set(val)
    samples = train | val
    assert samples["game-icons__horse-head"][0] == "horse head"
    assert samples["fluent-emoji-high-contrast__zebra"][0] == "zebra"
    assert all(image.shape == (72, 72, 3) for _, image in samples.values())
    polarity = {key: image[0, 0, 0] for key, (_, image) in samples.items()}  # corner = paper
    assert set(polarity.values()) == {0, 255}  # both polarities occur
    for key, corner in polarity.items():
        assert corner == (0 if build_glyphs.key_hash("polarity:" + key) < 0.5 else 255)
    assert (tmp_path / "out" / "dataset_type.txt").read_text() == "retrieval\n"
    # a second build into another folder writes the same samples
    build_glyphs.build(tmp_path / "again", packages=folder, shard_size=10)
    again = read_split(tmp_path / "again" / "train") | read_split(tmp_path / "again" / "val")
    assert {k: v[0] for k, v in again.items()} == {k: v[0] for k, v in samples.items()}
    assert all(np.array_equal(again[k][1], samples[k][1]) for k in samples)


def test_a_complete_build_is_kept_and_a_changed_one_rebuilt(tmp_path):
    folder = packages_dir(tmp_path, {"game-icons": {f"icon-{c}": {"body": SQUARE} for c in "abcdefghij"}})
    out = tmp_path / "out"
    counts = build_glyphs.build(out, packages=folder)
    stamp = (out / "train" / "shard-000000.tar").stat().st_mtime_ns
    assert build_glyphs.build(out, packages=folder) == counts
    assert (out / "train" / "shard-000000.tar").stat().st_mtime_ns == stamp
    info = json.loads((out / "build_info.json").read_text())
    info["params"]["glyph"] = 1
    (out / "build_info.json").write_text(json.dumps(info))
    assert build_glyphs.build(out, packages=folder) == counts
    assert json.loads((out / "build_info.json").read_text())["params"]["glyph"] == build_glyphs.GLYPH


def fake_npm(bin_dir: Path, script: str) -> None:
    bin_dir.mkdir(exist_ok=True)
    npm = bin_dir / "npm"
    npm.write_text("#!/usr/bin/env python3\n" + script)
    npm.chmod(npm.stat().st_mode | stat.S_IEXEC)


def test_fetch_packs_each_missing_set_with_npm(tmp_path, monkeypatch):
    # the stand-in npm writes the tarball npm would name into --pack-destination, and logs its call
    fake_npm(
        tmp_path / "bin",
        f"""import sys, io, json, os, tarfile
args = sys.argv[1:]
open({str(tmp_path / "calls")!r}, "a").write(" ".join(args) + "\\n")
spec, dest = args[1], os.path.join(os.getcwd(), args[args.index("--pack-destination") + 1])
package, version = spec.rsplit("@", 1)
data = json.dumps({{"icons": {{"x": {{"body": ""}}}}}}).encode()
with tarfile.open(f"{{dest}}/{{package.lstrip('@').replace('/', '-')}}-{{version}}.tgz", "w:gz") as tar:
    info = tarfile.TarInfo("package/icons.json"); info.size = len(data); tar.addfile(info, io.BytesIO(data))
""",
    )
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    # a relative --out, as `clipkit data build glyphs --out data/glyphs` gives it: npm resolves
    # --pack-destination against its own working directory, as real npm does
    monkeypatch.chdir(tmp_path)
    dest = Path("packages")
    dest.mkdir()
    kept = iconify_tarball(dest / build_glyphs.tarball_name(*build_glyphs.PACKAGES["game-icons"]), {})
    found = build_glyphs.fetch_packages(dest)
    assert set(found) == set(build_glyphs.PACKAGES) and found["game-icons"] == kept
    calls = (tmp_path / "calls").read_text().splitlines()
    assert sorted(c.split()[1] for c in calls) == sorted(
        f"{p}@{v}" for n, (p, v) in build_glyphs.PACKAGES.items() if n != "game-icons"
    )
    assert build_glyphs.read_icon_set(found["emojione-monotone"])["icons"] == {"x": {"body": ""}}
    assert sorted(p.name for p in dest.iterdir()) == sorted(
        p.name for p in found.values()
    )  # no temporary left


def test_a_failing_npm_names_the_package_and_leaves_nothing(tmp_path, monkeypatch):
    fake_npm(tmp_path / "bin", "import sys\nprint('npm error code E404', file=sys.stderr)\nsys.exit(1)\n")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    with pytest.raises(
        RuntimeError, match=r"npm pack @iconify-json/game-icons@1\.2\.4 failed \(exit 1\).*E404"
    ):
        build_glyphs.fetch_packages(tmp_path / "packages", ["game-icons"])
    assert list((tmp_path / "packages").iterdir()) == []


def test_no_npm_says_how_to_get_the_sets(tmp_path, monkeypatch):
    monkeypatch.setattr(build_glyphs.shutil, "which", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"npm is not installed.*apt-get install npm.*--packages"):
        build_glyphs.fetch_packages(tmp_path / "packages", ["game-icons"])


def test_a_truncated_package_is_named_with_what_to_do(tmp_path):
    folder = packages_dir(tmp_path, {})
    victim = folder / build_glyphs.tarball_name(*build_glyphs.PACKAGES["emojione-monotone"])
    victim.write_bytes(victim.read_bytes()[:20])
    with pytest.raises(
        ValueError, match=r"iconify-json-emojione-monotone-1\.2\.1\.tgz: not an Iconify.*delete it"
    ):
        build_glyphs.build(tmp_path / "out", packages=folder)
    assert not (tmp_path / "out" / "build_info.json").exists()
