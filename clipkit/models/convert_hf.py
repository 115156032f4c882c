"""Convert a Hugging Face ``CLIPModel`` or ``SiglipModel`` into an open_clip model, exactly.

``hf_to_open_clip(model, image_processor) -> (model_cfg, preprocess_cfg, state_dict)`` is pure:
it reads the HF model's config, weights and image processor and returns what open_clip's
``local-dir:`` layout holds (``open_clip_config.json`` = ``{"model_cfg", "preprocess_cfg"}``
and the weights file), without touching the disk. ``save_hf_tokenizer(tokenizer, out)`` writes
the tokenizer files into that folder. The config holds no path: open_clip's ``local-dir:<out>``
loader reads the tokenizer from ``<out>`` itself whenever ``text_cfg.hf_tokenizer_name`` is
non-empty (its value is then ignored; we write ``"."``), so a copied folder loads anywhere.

CLIPModel -> open_clip ``CLIP`` (native ``VisionTransformer`` + text ``Transformer``)::

    vision_model.embeddings.patch_embedding   -> visual.conv1 (both bias-free)
    vision_model.embeddings.class_embedding   -> visual.class_embedding
    vision_model.embeddings.position_embedding-> visual.positional_embedding  (1 + N, D)
    vision_model.pre_layrnorm / post_layernorm-> visual.ln_pre / visual.ln_post
    visual_projection.weight (E, D)           -> visual.proj (D, E)        transposed
    text_model.embeddings.token/position      -> token_embedding / positional_embedding
    text_model.final_layer_norm               -> ln_final
    text_projection.weight (E, D)             -> text_projection (D, E)    transposed
    encoder.layers.i.self_attn.{q,k,v}_proj   -> resblocks.i.attn.in_proj_{weight,bias}  [q; k; v]
    encoder.layers.i.self_attn.out_proj       -> resblocks.i.attn.out_proj
    encoder.layers.i.layer_norm{1,2}          -> resblocks.i.ln_{1,2}
    encoder.layers.i.mlp.fc{1,2}              -> resblocks.i.mlp.c_{fc,proj}

Text pooling follows HF: the first ``eos_token_id`` (``pool_type: eos``), or the highest token id
when the config's ``eos_token_id`` is the legacy 2 (``argmax``).

SiglipModel -> open_clip ``CustomTextCLIP`` with a timm ViT image tower (``timm_pool: map``,
``timm_proj: none``) and a bidirectional text ``Transformer`` pooled at the last token with a
biased ``text_projection`` (open_clip's ``ViT-*-SigLIP`` layout), plus ``logit_bias``. open_clip
builds a timm tower from a registered timm architecture name only (no width, depth or activation
is passed), so the HF vision config must match one of timm's registered SigLIP ViTs exactly,
activation included; otherwise ``HFConversionError`` says which differs.

Activations are matched numerically: the HF ``hidden_act`` must equal open_clip's QuickGELU,
GELU or tanh-GELU on a grid of inputs. Tokenization: open_clip's ``HFTokenizer`` runs the same
HF tokenizer with ``padding="max_length"`` to the text length, after its whitespace clean
(``ftfy`` fix, HTML unescape, collapsed whitespace), which HF's call does not do.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from clipkit.errors import ClipkitError


class HFConversionError(ClipkitError):
    """A Hugging Face model that has no exact open_clip form."""


State = dict[str, Tensor]

# HF encoder layer -> open_clip ResidualAttentionBlock / timm Block (after q, k, v are fused).
OPEN_CLIP_BLOCK = {
    "layer_norm1": "ln_1",
    "self_attn.out_proj": "attn.out_proj",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}
TIMM_BLOCK = {
    "layer_norm1": "norm1",
    "self_attn.out_proj": "attn.proj",
    "layer_norm2": "norm2",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}
# open_clip activation -> (quick_gelu flag, act_kwargs for the tower config)
OPEN_CLIP_ACTS: dict[str, tuple[bool, dict[str, str] | None]] = {
    "quick_gelu": (True, None),
    "gelu": (False, None),
    "gelu_tanh": (False, {"approximate": "tanh"}),
}
INTERPOLATION = {2: "bilinear", 3: "bicubic"}  # PIL resample codes HF stores -> open_clip names


def hf_to_open_clip(model: nn.Module, image_processor: Any) -> tuple[dict, dict, State]:
    """Map a transformers ``CLIPModel`` / ``SiglipModel`` and its image processor to open_clip.

    Returns ``(model_cfg, preprocess_cfg, state_dict)``: ``open_clip_config.json`` is
    ``{"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}`` and ``state_dict`` loads into
    the model open_clip builds from ``model_cfg`` with ``strict=True`` (checked here on the meta
    device). Tensors are fp32 copies. Raises ``HFConversionError`` for anything else.
    """
    from transformers import CLIPModel, SiglipModel

    if isinstance(model, CLIPModel):
        model_cfg, state = _clip(model)
    elif isinstance(model, SiglipModel):
        model_cfg, state = _siglip(model)
    else:
        raise HFConversionError(
            f"a {type(model).__name__} has no open_clip form; exportable Hugging Face models are "
            "CLIPModel and SiglipModel"
        )
    image_size = model.config.vision_config.image_size
    preprocess_cfg = _preprocess_cfg(image_processor, image_size)
    _check_keys(model_cfg, state)
    return model_cfg, preprocess_cfg, {k: v.detach().float().contiguous().clone() for k, v in state.items()}


def save_hf_tokenizer(tokenizer: Any, out: str | Path) -> None:
    """Write the HF ``tokenizer`` into the export folder ``out``, where open_clip's
    ``get_tokenizer("local-dir:<out>")`` loads it (as ``AutoTokenizer.from_pretrained(out)``)."""
    tokenizer.save_pretrained(str(out))


# ----------------------------------------------------------------------------- CLIP


def _clip(model: nn.Module) -> tuple[dict, State]:
    tc, vc = model.config.text_config, model.config.vision_config
    vact, tact = _open_clip_act(vc.hidden_act, "vision"), _open_clip_act(tc.hidden_act, "text")
    if OPEN_CLIP_ACTS[vact][0] != OPEN_CLIP_ACTS[tact][0]:
        raise HFConversionError(
            f"the vision tower uses {vc.hidden_act} and the text tower {tc.hidden_act}; open_clip's "
            "quick_gelu switch sets both towers at once"
        )
    vision_cfg = {
        "image_size": vc.image_size,
        "patch_size": vc.patch_size,
        "width": vc.hidden_size,
        "layers": vc.num_hidden_layers,
        "head_width": _head_width(vc),
        "mlp_ratio": _mlp_ratio(vc),
        **_tower_extras(vact, vc.layer_norm_eps),
    }
    text_cfg = {
        **_text_shape(tc),
        # HF pools at argmax(ids) for the legacy eos_token_id 2, else at the first eos_token_id
        "pool_type": "argmax" if tc.eos_token_id == 2 else "eos",
        "eos_id": tc.eos_token_id,
        **_tower_extras(tact, tc.layer_norm_eps),
    }
    model_cfg = {
        "embed_dim": model.config.projection_dim,
        "quick_gelu": OPEN_CLIP_ACTS[vact][0],
        "vision_cfg": vision_cfg,
        "text_cfg": text_cfg,
    }
    sd = model.state_dict()
    v, t = "vision_model.", "text_model."
    state = {
        "visual.conv1.weight": sd[v + "embeddings.patch_embedding.weight"],  # (D, 3, P, P)
        "visual.class_embedding": sd[v + "embeddings.class_embedding"],  # (D,)
        "visual.positional_embedding": sd[v + "embeddings.position_embedding.weight"],  # (1 + N, D)
        **_renamed(sd, v + "pre_layrnorm.", "visual.ln_pre."),
        **_encoder(
            sd, v + "encoder.", "visual.transformer.resblocks.", vc.num_hidden_layers, OPEN_CLIP_BLOCK
        ),
        **_renamed(sd, v + "post_layernorm.", "visual.ln_post."),
        "visual.proj": sd["visual_projection.weight"].T,  # (D, E): open_clip does x @ proj
        "token_embedding.weight": sd[t + "embeddings.token_embedding.weight"],  # (V, D)
        "positional_embedding": sd[t + "embeddings.position_embedding.weight"],  # (L, D)
        **_encoder(sd, t + "encoder.", "transformer.resblocks.", tc.num_hidden_layers, OPEN_CLIP_BLOCK),
        **_renamed(sd, t + "final_layer_norm.", "ln_final."),
        "text_projection": sd["text_projection.weight"].T,  # (D, E)
        "logit_scale": sd["logit_scale"].reshape(()),
    }
    return model_cfg, state


# ----------------------------------------------------------------------------- SigLIP


def _siglip(model: nn.Module) -> tuple[dict, State]:
    tc, vc = model.config.text_config, model.config.vision_config
    if not getattr(vc, "vision_use_head", True):
        raise HFConversionError(
            "this SigLIP image tower has no attention-pooling head (vision_use_head=False), so "
            "get_image_features has nothing to return; only SigLIP models with the head export"
        )
    if tc.projection_size != vc.hidden_size:
        raise HFConversionError(
            f"the text head projects to {tc.projection_size} but the image tower is {vc.hidden_size} wide; "
            "open_clip's SigLIP layout has one embedding width for both towers"
        )
    sd = model.state_dict()
    trunk = _siglip_trunk(sd, vc.num_hidden_layers)
    timm_name = _timm_siglip_arch(trunk, vc)
    t = "text_model."
    text_cfg = {
        **_text_shape(tc),
        "no_causal_mask": True,  # SigLIP text attends both ways, without a padding mask
        "proj_bias": True,
        "pool_type": "last",
        **_tower_extras(_open_clip_act(tc.hidden_act, "text"), tc.layer_norm_eps),
    }
    model_cfg = {
        "embed_dim": vc.hidden_size,
        "init_logit_bias": float(sd["logit_bias"].reshape(())),
        "custom_text": True,
        "vision_cfg": {
            "image_size": vc.image_size,
            "timm_model_name": timm_name,
            "timm_model_pretrained": False,
            "timm_pool": "map",
            "timm_proj": "none",
        },
        "text_cfg": text_cfg,
    }
    state = {
        **{"visual.trunk." + k: w for k, w in trunk.items()},
        "text.token_embedding.weight": sd[t + "embeddings.token_embedding.weight"],  # (V, D)
        "text.positional_embedding": sd[t + "embeddings.position_embedding.weight"],  # (L, D)
        **_encoder(sd, t + "encoder.", "text.transformer.resblocks.", tc.num_hidden_layers, OPEN_CLIP_BLOCK),
        **_renamed(sd, t + "final_layer_norm.", "text.ln_final."),
        **_renamed(sd, t + "head.", "text.text_projection."),  # nn.Linear on both sides
        "logit_scale": sd["logit_scale"].reshape(()),
        "logit_bias": sd["logit_bias"].reshape(()),
    }
    return model_cfg, state


def _siglip_trunk(sd: State, layers: int) -> State:
    """HF SigLIP vision weights in timm ``VisionTransformer`` names (no class token, MAP head)."""
    v, h = "vision_model.", "vision_model.head."
    d = sd[h + "probe"].shape[-1]
    attn_w, attn_b = sd[h + "attention.in_proj_weight"], sd[h + "attention.in_proj_bias"]  # (3D, D), (3D,)
    return {
        "patch_embed.proj.weight": sd[v + "embeddings.patch_embedding.weight"],  # (D, 3, P, P)
        "patch_embed.proj.bias": sd[v + "embeddings.patch_embedding.bias"],
        "pos_embed": sd[v + "embeddings.position_embedding.weight"][None],  # (1, N, D)
        **_encoder(sd, v + "encoder.", "blocks.", layers, TIMM_BLOCK, fused="attn.qkv"),
        **_renamed(sd, v + "post_layernorm.", "norm."),
        "attn_pool.latent": sd[h + "probe"],  # (1, 1, D)
        "attn_pool.q.weight": attn_w[:d],
        "attn_pool.q.bias": attn_b[:d],
        "attn_pool.kv.weight": attn_w[d:],  # [k; v]
        "attn_pool.kv.bias": attn_b[d:],
        **_renamed(sd, h + "attention.out_proj.", "attn_pool.proj."),
        **_renamed(sd, h + "layernorm.", "attn_pool.norm."),
        **_renamed(sd, h + "mlp.", "attn_pool.mlp."),
    }


def _timm_siglip_arch(trunk: State, vc: Any) -> str:
    """The registered timm SigLIP ViT whose weights, image size, norms and activation are this
    model's; ``HFConversionError`` naming the nearest one's differences when none is."""
    import timm

    hf_act = _hf_act(vc.hidden_act)
    shapes = {k: tuple(w.shape) for k, w in trunk.items()}

    def same_input(name: str) -> bool:  # from timm's metadata, without building the model
        cfg = timm.get_pretrained_cfg(name)
        return cfg is not None and tuple(cfg.input_size) == (3, vc.image_size, vc.image_size)

    names = [
        n
        for n in timm.list_models("vit_*siglip*")  # not naflexvit_*: another patch embedding
        if f"patch{vc.patch_size}_" in n and same_input(n)
    ]
    near: list[str] = []
    for name in sorted(names, key=lambda n: ("_gap" in n, n)):
        with torch.device("meta"):  # shapes only: no memory, no init time
            net = timm.create_model(name, num_classes=0, global_pool="map")  # as open_clip builds it
        got = {k: tuple(w.shape) for k, w in net.state_dict().items()}
        if got != shapes:
            continue
        diffs = []
        if not _same_act(net.blocks[0].mlp.act, hf_act) or not _same_act(net.attn_pool.mlp.act, hf_act):
            diffs.append(f"activation {net.blocks[0].mlp.act} (this model {vc.hidden_act})")
        eps = {m.eps for m in net.modules() if isinstance(m, nn.LayerNorm)}
        if eps != {vc.layer_norm_eps}:
            diffs.append(f"LayerNorm eps {sorted(eps)} (this model {vc.layer_norm_eps})")
        if net.blocks[0].attn.num_heads != vc.num_attention_heads:
            diffs.append(f"{net.blocks[0].attn.num_heads} heads (this model {vc.num_attention_heads})")
        if not diffs:
            return name
        near.append(f"{name}: " + ", ".join(diffs))
    raise HFConversionError(
        "open_clip builds a SigLIP image tower from a registered timm architecture name and passes it "
        "no width, depth or activation, so the tower must match one exactly; none of timm's SigLIP ViTs "
        f"matches this one (width {vc.hidden_size}, {vc.num_hidden_layers} layers, {vc.num_attention_heads} "
        f"heads, mlp {vc.intermediate_size}, patch {vc.patch_size}, image {vc.image_size}, {vc.hidden_act})"
        + (f"; same shapes but different {'; '.join(near)}" if near else "")
        + ". Use the model in clipkit with --model hf-clip:<dir> instead"
    )


# ----------------------------------------------------------------------------- shared pieces


def _renamed(sd: State, old: str, new: str) -> State:
    return {new + k[len(old) :]: w for k, w in sd.items() if k.startswith(old)}


def _encoder(sd: State, src: str, dst: str, layers: int, names: dict[str, str], fused: str = "") -> State:
    """HF encoder layers ``src + layers.i.`` -> ``dst + i.``; q, k, v stacked into one
    (3D, D) weight and (3D,) bias: open_clip's ``attn.in_proj_*`` or timm's ``attn.qkv.*``."""
    out: State = {}
    for i in range(layers):
        a, b = f"{src}layers.{i}.", f"{dst}{i}."
        for hf, ours in names.items():
            out.update(_renamed(sd, a + hf + ".", b + ours + "."))
        for part in ("weight", "bias"):
            qkv = torch.cat([sd[f"{a}self_attn.{n}_proj.{part}"] for n in "qkv"])  # (3D, D) or (3D,)
            out[f"{b}{fused}.{part}" if fused else f"{b}attn.in_proj_{part}"] = qkv
    return out


def _head_width(cfg: Any) -> int:
    if cfg.hidden_size % cfg.num_attention_heads:
        raise HFConversionError(
            f"width {cfg.hidden_size} is not a multiple of {cfg.num_attention_heads} heads"
        )
    return cfg.hidden_size // cfg.num_attention_heads


def _mlp_ratio(cfg: Any) -> float:
    ratio = cfg.intermediate_size / cfg.hidden_size
    if int(cfg.hidden_size * ratio) != cfg.intermediate_size:  # open_clip's mlp width is int(width * ratio)
        raise HFConversionError(
            f"open_clip cannot express an MLP of {cfg.intermediate_size} for width {cfg.hidden_size}"
        )
    return ratio


def _text_shape(tc: Any) -> dict[str, Any]:
    """The open_clip text_cfg fields that CLIP and SigLIP text towers share."""
    return {
        "context_length": tc.max_position_embeddings,
        "vocab_size": tc.vocab_size,
        "hf_tokenizer_name": ".",  # non-empty: local-dir: then reads the tokenizer from the folder
        "width": tc.hidden_size,
        "heads": tc.num_attention_heads,
        "layers": tc.num_hidden_layers,
        "mlp_ratio": _mlp_ratio(tc),
    }


def _tower_extras(act: str, eps: float) -> dict[str, Any]:
    extras: dict[str, Any] = {"norm_kwargs": {"eps": eps}}
    if OPEN_CLIP_ACTS[act][1]:
        extras["act_kwargs"] = OPEN_CLIP_ACTS[act][1]
    return extras


def _hf_act(name: str) -> Callable[[Tensor], Tensor]:
    from transformers.activations import ACT2FN

    if name not in ACT2FN:
        raise HFConversionError(f"unknown Hugging Face activation '{name}'")
    return ACT2FN[name]


def _same_act(act: Callable[[Tensor], Tensor], ref: Callable[[Tensor], Tensor]) -> bool:
    x = torch.linspace(-8, 8, 4001)
    return torch.allclose(act(x), ref(x), rtol=0, atol=1e-6)


def _open_clip_act(name: str, tower: str) -> str:
    """The OPEN_CLIP_ACTS entry that computes HF's ``name`` (compared on a grid of inputs)."""
    from open_clip.transformer import QuickGELU

    ref = _hf_act(name)
    for act, (quick, kwargs) in OPEN_CLIP_ACTS.items():
        if _same_act(QuickGELU() if quick else nn.GELU(**(kwargs or {})), ref):
            return act
    raise HFConversionError(
        f"the {tower} tower's activation '{name}' is none of open_clip's (QuickGELU, GELU, tanh GELU)"
    )


def _field(obj: Any, key: str) -> Any:
    # transformers 5 keeps sizes as SizeDict (attributes), 4 as plain dicts
    return obj.get(key) if isinstance(obj, dict) else getattr(obj, key, None)


def _preprocess_cfg(proc: Any, image_size: int) -> dict[str, Any]:
    """open_clip's preprocess_cfg for a CLIP / SigLIP image processor: resize (shortest side then
    centre crop, or squash to a square), scale to [0, 1], normalise."""
    resample = getattr(proc, "resample", None)
    resample = getattr(resample, "value", resample)  # PILImageResampling enum or int
    if resample not in INTERPOLATION or not proc.do_resize:
        raise HFConversionError(f"image processor resizes with {resample!r}; open_clip has bilinear, bicubic")
    if not proc.do_rescale or abs(proc.rescale_factor - 1 / 255) > 1e-12:
        raise HFConversionError("open_clip always scales pixels by 1/255; this image processor does not")
    if proc.do_center_crop:
        sizes = {
            _field(proc.size, "shortest_edge"),
            _field(proc.crop_size, "height"),
            _field(proc.crop_size, "width"),
        }
        mode = "shortest"
    else:
        sizes, mode = {_field(proc.size, "height"), _field(proc.size, "width")}, "squash"
    if sizes != {image_size}:
        raise HFConversionError(
            f"the image processor resizes to {sorted(sizes, key=str)} but the model reads {image_size} px; "
            "open_clip resizes straight to the model's size"
        )
    mean = list(proc.image_mean) if proc.do_normalize else [0.0, 0.0, 0.0]
    std = list(proc.image_std) if proc.do_normalize else [1.0, 1.0, 1.0]
    return {
        "size": image_size,
        "mode": "RGB",
        "mean": [float(m) for m in mean],
        "std": [float(s) for s in std],
        "interpolation": INTERPOLATION[resample],
        "resize_mode": mode,
    }


def _check_keys(model_cfg: dict, state: State) -> None:
    """Build the open_clip model on the meta device; its parameter names and shapes must be ours."""
    from open_clip.model import CLIP, CustomTextCLIP

    cfg = {k: v for k, v in model_cfg.items() if k != "custom_text"}
    with torch.device("meta"):
        net = (CustomTextCLIP if model_cfg.get("custom_text") else CLIP)(**cfg)
    want = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    if want != got:
        bad = sorted(set(want.items()) ^ set(got.items()))[:6]
        raise HFConversionError(f"the converted weights do not fit open_clip's model: {bad}")
