"""Oracles for the registered losses: open_clip parity, hand-worked examples, registry-wide properties."""

from __future__ import annotations

import copy
import inspect
import math

import open_clip.loss as oc
import pytest
import torch
import torch.nn.functional as F

from clipkit.config import LossConfig
from clipkit.losses import LOSSES, build_loss

# Constructor arguments for losses whose __init__ has required parameters.
EXAMPLE_ARGS: dict[str, dict] = {
    "sogclr": {"num_samples": 32},
    "isogclr": {"num_samples": 32},
    # teacher=None: the teacher's embeddings come in out["teacher_*"] (make_inputs adds them).
    "distill_kl": {"teacher": None},
    "dclip": {"teacher": None},
}
# Losses that draw random numbers (mixing pairs, mixing weights): every call below is made
# after the same torch.manual_seed. Their draws are tied to batch positions, so permuting the
# batch changes which samples are mixed: they are left out of the permutation test.
STOCHASTIC = {"mochi", "m3col"}


def make_inputs(b: int = 8, d: int = 16, seed: int = 0, dtype: torch.dtype = torch.float64):
    """Random (out, batch) holding every key any registered loss may need; leaves require grad."""
    g = torch.Generator().manual_seed(seed)

    def leaf(x: torch.Tensor) -> torch.Tensor:
        return x.to(dtype).detach().requires_grad_()

    out = {
        "image_emb": leaf(F.normalize(torch.randn(b, d, generator=g, dtype=torch.float64), dim=-1)),
        "text_emb": leaf(F.normalize(torch.randn(b, d, generator=g, dtype=torch.float64), dim=-1)),
        "logit_scale": leaf(torch.tensor(math.exp(1.5 + torch.rand(1, generator=g).item()))),
        "logit_bias": leaf(torch.tensor(-2.0 * torch.rand(1, generator=g).item())),
        # Locked-tower features (CWCL); any width, not normalised.
        "image_tower_features": torch.randn(b, d + 4, generator=g, dtype=torch.float64).to(dtype),
        "text_tower_features": torch.randn(b, d - 4, generator=g, dtype=torch.float64).to(dtype),
    }
    batch = {"idx": torch.randperm(4 * b, generator=g)[:b]}
    # Embeddings of a momentum model (albef_md) and of a teacher (distill_kl, dclip): no grad.
    for k in ("momentum_image_emb", "momentum_text_emb", "teacher_image_emb", "teacher_text_emb"):
        out[k] = F.normalize(torch.randn(b, d, generator=g, dtype=torch.float64), dim=-1).to(dtype)
    out["teacher_logit_scale"] = torch.tensor(10.0 + 5 * torch.rand(1, generator=g).item()).to(dtype)
    return out, batch


def grads(loss: torch.Tensor, out: dict, keys=("image_emb", "text_emb", "logit_scale", "logit_bias")):
    return torch.autograd.grad(loss, [out[k] for k in keys], allow_unused=True)


def build(name: str, **kw) -> torch.nn.Module:
    return LOSSES.build(name, **{**EXAMPLE_ARGS.get(name, {}), **kw})


# ----------------------------------------------------------------------------- open_clip parity


@pytest.mark.parametrize("dtype,rtol,atol", [(torch.float64, 1e-10, 1e-12), (torch.float32, 1e-6, 1e-7)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_clip_matches_open_clip(dtype, rtol, atol, with_bias):
    out, _ = make_inputs(b=16, d=32, seed=1, dtype=dtype)
    if not with_bias:
        del out["logit_bias"]
    ours = LOSSES.build("clip")(out)
    ref = oc.ClipLoss()(out["image_emb"], out["text_emb"], out["logit_scale"], out.get("logit_bias"))
    torch.testing.assert_close(ours["loss"], ref, rtol=rtol, atol=atol)
    keys = ("image_emb", "text_emb", "logit_scale") + (("logit_bias",) if with_bias else ())
    for k, a, r in zip(keys, grads(ours["loss"], out, keys), grads(ref, out, keys)):
        assert a is not None, k
        torch.testing.assert_close(a, r, rtol=rtol, atol=atol, msg=lambda m, k=k: f"d/d{k}: {m}")


@pytest.mark.parametrize("dtype,rtol,atol", [(torch.float64, 1e-10, 1e-12), (torch.float32, 1e-6, 1e-6)])
def test_siglip_matches_open_clip(dtype, rtol, atol):
    out, _ = make_inputs(b=16, d=32, seed=2, dtype=dtype)
    ours = LOSSES.build("siglip")(out)["loss"]
    ref = oc.SigLipLoss()(out["image_emb"], out["text_emb"], out["logit_scale"], out["logit_bias"])
    torch.testing.assert_close(ours, ref, rtol=rtol, atol=atol)
    keys = ("image_emb", "text_emb", "logit_scale", "logit_bias")
    for k, a, r in zip(keys, grads(ours, out), grads(ref, out)):
        torch.testing.assert_close(a, r, rtol=rtol, atol=atol, msg=lambda m, k=k: f"d/d{k}: {m}")


def test_clip_local_loss_is_identical_on_one_process():
    out, _ = make_inputs(seed=3)
    a = LOSSES.build("clip", local_loss=False)(out)
    b = LOSSES.build("clip", local_loss=True, gather_with_grad=False)(out)
    for k in ("loss", "loss_i2t", "loss_t2i"):
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-14)


def test_clip_label_smoothing_matches_naive_loop():
    out, _ = make_inputs(b=5, d=7, seed=4)
    eps = 0.2
    got = LOSSES.build("clip", label_smoothing=eps)(out)
    x, y, s = out["image_emb"], out["text_emb"], out["logit_scale"]
    n = x.shape[0]

    def smoothed_ce(a, b, i):  # row i of a against all of b; target (1-eps) onehot + eps/n
        z = [s * torch.dot(a[i], b[j]) for j in range(n)]
        lse = torch.logsumexp(torch.stack(z), 0)
        return sum(-((1 - eps) * (j == i) + eps / n) * (z[j] - lse) for j in range(n))

    i2t = sum(smoothed_ce(x, y, i) for i in range(n)) / n
    t2i = sum(smoothed_ce(y, x, i) for i in range(n)) / n
    torch.testing.assert_close(got["loss_i2t"], i2t)
    torch.testing.assert_close(got["loss_t2i"], t2i)
    for a, r in zip(grads(got["loss"], out), grads((i2t + t2i) / 2, out), strict=True):
        if r is not None:
            torch.testing.assert_close(a, r)


# ----------------------------------------------------------------------------- hand-worked examples


def hand_out(**extra) -> dict:
    # Images e1, e2; texts (0.6, 0.8), e2; scale 2, so z = s * img @ txt.T = [[1.2, 0], [1.6, 2]].
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    txt = torch.tensor([[0.6, 0.8], [0.0, 1.0]], dtype=torch.float64)
    return {"image_emb": img, "text_emb": txt, "logit_scale": torch.tensor(2.0, dtype=torch.float64), **extra}


def test_clip_hand_example():
    # i2t rows of z: [1.2, 0] target 0 -> log(1 + e^-1.2) = 0.2632818;
    #                [1.6, 2] target 1 -> log(1 + e^-0.4) = 0.5130153;  mean 0.3881489.
    # t2i rows of z.T: [1.2, 1.6] target 0 -> log(1 + e^0.4) = 0.9130153;
    #                  [0, 2] target 1 -> log(1 + e^-2) = 0.1269280;  mean 0.5199716.
    got = LOSSES.build("clip")(hand_out())
    assert got["loss_i2t"].item() == pytest.approx(0.3881489, abs=1e-6)
    assert got["loss_t2i"].item() == pytest.approx(0.5199716, abs=1e-6)
    assert got["loss"].item() == pytest.approx(0.4540602, abs=1e-6)


def test_siglip_hand_example():
    # bias -1: z = [[0.2, -1], [0.6, 1]]; labels +1 on the diagonal, -1 off it;
    # L = (1/2) [log(1+e^-0.2) + log(1+e^-1) + log(1+e^-1) + log(1+e^0.6)]
    #   = (1/2) [0.5981389 + 0.3132617 + 0.3132617 + 1.0374879] = 1.1310751
    got = LOSSES.build("siglip")(hand_out(logit_bias=torch.tensor(-1.0, dtype=torch.float64)))
    assert got["loss"].item() == pytest.approx(1.1310751, abs=1e-6)


# ----------------------------------------------------------------------------- registry / config


def test_unknown_loss_suggests_the_nearest_name():
    with pytest.raises(KeyError, match="did you mean 'siglip'"):
        LOSSES.build("sigclip")


def test_build_loss_from_config_checks_args():
    assert build_loss(LossConfig(name="clip", args={"label_smoothing": 0.1})).label_smoothing == 0.1
    with pytest.raises(TypeError, match="did you mean 'label_smoothing'"):
        build_loss(LossConfig(name="clip", args={"label_smothing": 0.1}))


def test_build_loss_names_a_missing_required_option():
    with pytest.raises(TypeError, match=r"loss 'sogclr' needs option 'num_samples'.*loss.args.num_samples"):
        build_loss(LossConfig(name="sogclr"))
    assert build_loss(LossConfig(name="sogclr", args={"num_samples": 10})).num_samples == 10


def test_siglip_without_bias_says_how_to_get_one():
    out, _ = make_inputs()
    del out["logit_bias"]
    with pytest.raises(KeyError, match=r"out\['logit_bias'\].*init_logit_bias"):
        LOSSES.build("siglip")(out)


def test_mismatched_embeddings_raise():
    out, _ = make_inputs()
    out["text_emb"] = out["text_emb"][:-1]
    with pytest.raises(ValueError, match="same B and D"):
        LOSSES.build("clip")(out)


# ----------------------------------------------------------------------------- every registered loss

NAMES = LOSSES.names()


def test_example_args_cover_required_parameters():
    for name in NAMES:
        params = inspect.signature(LOSSES.get(name)).parameters.values()
        required = [p.name for p in params if p.default is p.empty and p.kind is p.POSITIONAL_OR_KEYWORD]
        missing = set(required) - set(EXAMPLE_ARGS.get(name, {}))
        assert not missing, f"add EXAMPLE_ARGS['{name}'] = {{...}} for {sorted(missing)}"


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)  # the stochastic losses' draws


@pytest.mark.parametrize("name", NAMES)
def test_returns_finite_scalars_and_grads_reach_both_towers(name):
    out, batch = make_inputs(seed=5)
    res = build(name)(out, batch)
    assert "loss" in res
    for k, v in res.items():
        assert isinstance(v, torch.Tensor) and v.dim() == 0 and torch.isfinite(v), (k, v)
    gi, gt = grads(res["loss"], out, ("image_emb", "text_emb"))
    for g in (gi, gt):
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0


@pytest.mark.parametrize("name", sorted(set(NAMES) - STOCHASTIC))
def test_invariant_to_jointly_permuting_the_batch(name):
    out, batch = make_inputs(seed=6)
    loss = build(name)
    perm = torch.randperm(out["image_emb"].shape[0], generator=torch.Generator().manual_seed(0))
    p_out = {k: (v[perm] if v.dim() > 0 else v) for k, v in out.items()}
    p_batch = {"idx": batch["idx"][perm]}
    a = copy.deepcopy(loss)(out, batch)
    b = copy.deepcopy(loss)(p_out, p_batch)
    for k in a:
        torch.testing.assert_close(a[k], b[k], msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.parametrize("name", NAMES)
def test_invariant_to_rotating_the_embedding_space(name):
    out, batch = make_inputs(seed=7)
    q, _ = torch.linalg.qr(
        torch.randn(16, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    )
    r_out = {k: v @ q if k.endswith("_emb") else v for k, v in out.items()}  # every embedding
    loss = build(name)
    torch.manual_seed(0)
    a = copy.deepcopy(loss)(out, batch)
    torch.manual_seed(0)
    b = copy.deepcopy(loss)(r_out, batch)
    for k in a:
        torch.testing.assert_close(a[k], b[k], msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_round_trip_and_eval_mode_is_pure(name):
    out, batch = make_inputs(seed=8)
    loss = build(name)
    loss(out, batch)  # a training step (stateful losses update their state)
    restored = build(name)
    restored.load_state_dict(copy.deepcopy(loss.state_dict()))
    torch.manual_seed(1)
    want = loss(out, batch)["loss"]
    torch.manual_seed(1)
    torch.testing.assert_close(want, restored(out, batch)["loss"])
    loss.eval()
    torch.manual_seed(2)
    first = loss(out, batch)["loss"]
    torch.manual_seed(2)
    second = loss(out, batch)["loss"]
    torch.testing.assert_close(first, second, rtol=0, atol=0)


@pytest.mark.parametrize("name", NAMES)
def test_does_not_modify_its_inputs(name):
    out, batch = make_inputs(seed=9)
    before = {k: v.detach().clone() for k, v in {**out, **batch}.items()}
    build(name)(out, batch)
    for k, v in {**out, **batch}.items():
        assert torch.equal(v.detach(), before[k]), k
