"""The demo's model at 224 px as an open_clip folder, for ``eval_parity.py --model demo224``.

The demo recipe (``train/lit_emoji.yaml``: timm ``tf_efficientnet_lite0`` with its bundled
ImageNet weights, locked; bundled MiniLM; linear heads into 256-d) at
``model.vision.image_size=224``, either

* trained for ``samples`` samples (``clipkit train``, seed 0), or
* with ``samples`` = 0, untrained: the recipe's heads seeded (``clipkit.models.specs``, seed 0),

then written by ``clipkit export`` as an open_clip ``local-dir:`` folder (config, weights, the
MiniLM config and tokenizer), which CLIP_benchmark loads with ``--model local-dir:<folder>``
and clipkit with ``--model open_clip:local-dir:<folder>``: both tools evaluate the same file.
Nothing is downloaded (``HF_HUB_OFFLINE=1``). The folder is reused by later runs when its
``.done`` stamp matches the recipe and sample count.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "train" / "lit_emoji.yaml"
IMAGE_SIZE = 224
WEIGHTS = "open_clip_model.safetensors"  # in the export folder (open_clip's local-dir layout)


def _clipkit(args: list[str], log: Path, threads: int) -> None:
    env = os.environ | {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    if threads:
        env |= {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    cmd = [str(ROOT / ".venv" / "bin" / "clipkit"), *args]
    with open(log, "a") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, check=False)
    if proc.returncode != 0:
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-20:])
        raise RuntimeError(f"failed ({proc.returncode}): {' '.join(cmd)}\n{tail}")


def demo_export(out: Path, samples: int, threads: int = 0) -> Path:
    """The export folder of the demo model at 224 px (built once under ``out``); see the module doc."""
    tag = f"demo224-s{samples}"
    folder = out / "model" / tag
    export = folder / "export"
    stamp = {"recipe": RECIPE.read_text(), "image_size": IMAGE_SIZE, "samples": samples}
    done = export / ".done"
    if done.is_file() and json.loads(done.read_text()) == stamp:
        return export
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    log = folder / "build.log"
    overrides = [f"model.vision.image_size={IMAGE_SIZE}", "train.seed=0"]
    if samples > 0:
        overrides += [f"train.samples={samples}", f"train.output_dir={folder}", "train.run_name=run"]
        overrides += [f"train.threads={threads}"]
        print(f"training the demo recipe at {IMAGE_SIZE} px for {samples} samples (once) ...", flush=True)
        _clipkit(["train", str(RECIPE), *overrides], log, threads)
        spec = str(folder / "run")
    else:
        spec = str(folder / "demo224.yaml")  # the recipe with the 224 px override, heads seeded
        text = RECIPE.read_text()
        if "    image_size: 160" not in text:
            raise RuntimeError(
                f"{RECIPE}: no 'image_size: 160' line to set to {IMAGE_SIZE}; update _demo_model.py"
            )
        Path(spec).write_text(text.replace("    image_size: 160", f"    image_size: {IMAGE_SIZE}", 1))
    print(f"exporting {spec} as an open_clip folder ...", flush=True)
    _clipkit(["export", "--model", spec, "--out", str(export), "--name", "clipkit-demo224"], log, threads)
    done.write_text(json.dumps(stamp))
    return export
