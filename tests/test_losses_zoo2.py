"""The second half of the objective zoo (albef_md, mochi, m3col, distill_kl, dclip) against slow,
loop-by-loop references, hand-worked 3x3 examples and, for distill_kl, OpenCLIP.

Registry-wide properties (finite scalars, gradients, invariances, state_dict, 2 gloo ranks,
gradient caching) are in test_losses.py, test_losses_dist.py and test_gradcache.py.
Their use inside training runs (checkpoints, resume, run-folder teachers, recipes) is in
test_losses_zoo_runs.py.
"""

from __future__ import annotations

import copy
import math

import open_clip.loss as oc
import pytest
import torch
import torch.nn.functional as F
from test_losses_zoo import check, dot, hand_out, rand_out
from torch import nn

from clipkit.losses import LOSSES
from clipkit.losses import m3col as m3col_module
from clipkit.losses.mochi import draw_mixes


def unit(b: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(b, d, generator=g, dtype=torch.float64), dim=-1)


def xent_rows(anchors, keys, scale, targets) -> torch.Tensor:
    """-1/n sum_i sum_j targets[i][j] log softmax_j(scale a_i.k_j), by loops."""
    n = len(anchors)
    total = 0
    for i in range(n):
        z = [scale * dot(anchors[i], k) for k in keys]
        lse = torch.log(sum(torch.exp(v) for v in z))
        total = total - sum(targets[i][j] * (z[j] - lse) for j in range(len(keys)))
    return total / n


# ----------------------------------------------------------------------------- albef_md


def ref_albef(out: dict, alpha: float, queue_img=(), queue_txt=()) -> torch.Tensor:
    x, y, s = out["image_emb"], out["text_emb"], out["logit_scale"]
    mx, my = out["momentum_image_emb"], out["momentum_text_emb"]
    n = x.shape[0]
    keys_txt = [my[j] for j in range(n)] + list(queue_txt)
    keys_img = [mx[j] for j in range(n)] + list(queue_img)

    def targets(m, keys):
        rows = []
        for i in range(n):
            e = [torch.exp(s.detach() * dot(m[i], k)) for k in keys]
            rows.append([alpha * e[j] / sum(e) + (1 - alpha) * (j == i) for j in range(len(keys))])
        return rows

    i2t = xent_rows(x, keys_txt, s, targets(mx, keys_txt))
    t2i = xent_rows(y, keys_img, s, targets(my, keys_img))
    return (i2t + t2i) / 2


def albef_out(b: int = 6, d: int = 5, seed: int = 0) -> dict:
    out = rand_out(b, d, seed)
    out["momentum_image_emb"] = unit(b, d, seed + 100)
    out["momentum_text_emb"] = unit(b, d, seed + 200)
    return out


@pytest.mark.parametrize("alpha", [0.0, 0.4, 1.0])
def test_albef_md_matches_loops(alpha):
    out = albef_out(seed=1)
    check(LOSSES.build("albef_md", alpha=alpha)(out), ref_albef(out, alpha), out)


def test_albef_md_queue_holds_the_newest_momentum_features_and_adds_negatives():
    loss = LOSSES.build("albef_md", queue_size=8)
    first, second = albef_out(b=6, seed=2), albef_out(b=6, seed=3)
    loss(first)
    queue_img = [first["momentum_image_emb"][j] for j in range(6)]
    queue_txt = [first["momentum_text_emb"][j] for j in range(6)]
    check(loss(second), ref_albef(second, 0.4, queue_img, queue_txt), second)
    # 12 features seen, 8 kept: the last 2 of the first batch, then all 6 of the second.
    want = torch.cat([first["momentum_text_emb"][4:], second["momentum_text_emb"]])
    torch.testing.assert_close(loss.queue_txt, want)
    loss.eval()
    loss(albef_out(seed=4))
    torch.testing.assert_close(loss.queue_txt, want)  # evaluation never enqueues
    restored = LOSSES.build("albef_md", queue_size=8)
    restored.load_state_dict(copy.deepcopy(loss.state_dict()))
    torch.testing.assert_close(restored.queue_img, loss.queue_img)


def test_albef_md_hand_example():
    # Momentum = student embeddings (hand_out), alpha .4, scale 1, S = [[1,0,0],[0,.6,.8],[0,.8,.6]].
    # Row 0: softmax(S_0) = [e, 1, 1] / (e + 2) = [.5761169, .2119416, .2119416];
    #   q = .4 softmax + .6 onehot = [.8304468, .0847766, .0847766];
    #   log softmax(S_0) = [1 - 1.5514447, -1.5514447, -1.5514447] -> -sum q log p = .7209980.
    # Row 1: lse = log(1 + e^.6 + e^.8) = 1.6189247; softmax = [.1981116, .3609829, .4409055];
    #   q = [.0792446, .7443932, .1763622] -> -sum q (S_1j - lse) = 1.0311991; row 2 the same.
    # mean (both directions equal) = (.7209980 + 2 * 1.0311991) / 3 = .9277987
    out = hand_out()
    out["momentum_image_emb"], out["momentum_text_emb"] = out["image_emb"], out["text_emb"]
    assert LOSSES.build("albef_md")(out)["loss"].item() == pytest.approx(0.9277987, abs=1e-6)


class Tiny(nn.Module):
    """The DualEncoder contract on (B, 4) "images" and (B, 3) float "texts"; one frozen layer."""

    def __init__(self):
        super().__init__()
        self.vision = nn.Linear(4, 5)
        self.text = nn.Linear(3, 5)
        self.text.weight.requires_grad_(False)  # a locked part: shared, not copied
        self.logit_scale = nn.Parameter(torch.tensor(1.0))

    def forward(self, batch: dict) -> dict:
        return {
            "image_emb": F.normalize(self.vision(batch["image"]), dim=-1),
            "text_emb": F.normalize(self.text(batch["text"]), dim=-1),
            "logit_scale": self.logit_scale.exp(),
        }


def test_albef_md_momentum_model_is_an_ema_of_the_trainable_parameters():
    torch.manual_seed(0)
    model, loss = Tiny(), LOSSES.build("albef_md", momentum=0.9)
    loss.attach(model)
    assert set(loss.ema) == {"vision.weight", "vision.bias", "text.bias", "logit_scale"}
    batch = {"image": torch.randn(4, 4), "text": torch.randn(4, 3)}
    start = copy.deepcopy(model)
    m_img, m_txt = loss.momentum_embeddings({}, batch)
    torch.testing.assert_close(m_img, model(batch)["image_emb"])  # at attach: the model itself
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5)
    loss.after_step(model)
    for n, p in model.named_parameters():
        if p.requires_grad:  # ema = .9 start + .1 now
            torch.testing.assert_close(loss.ema[n], 0.9 * dict(start.named_parameters())[n] + 0.1 * p)
    # The momentum forward = the model with the EMA values (and the shared frozen weight).
    mixed = copy.deepcopy(model)
    with torch.no_grad():
        for n, p in mixed.named_parameters():
            if n in loss.ema:
                p.copy_(loss.ema[n])
    m_img, m_txt = loss.momentum_embeddings({}, batch)
    torch.testing.assert_close(m_txt, mixed(batch)["text_emb"])
    assert model.training  # the eval-mode momentum forward leaves the model's mode alone
    # The loss state carries the EMA; a restored loss re-attaches to it instead of restarting.
    restored = LOSSES.build("albef_md", momentum=0.9)
    restored.load_state_dict(copy.deepcopy(loss.state_dict()))
    restored.attach(model)
    torch.testing.assert_close(restored.ema["vision.weight"], loss.ema["vision.weight"])
    with pytest.raises(KeyError, match="attach"):
        LOSSES.build("albef_md")(rand_out(), {"image": batch["image"]})


# ----------------------------------------------------------------------------- mochi


def ref_mochi_direction(a, k, s, draws, hard: int) -> torch.Tensor:
    n = a.shape[0]
    total = 0
    for i in range(n):
        with torch.no_grad():  # rank the negatives; build the synthetic ones (constants)
            negs = sorted((j for j in range(n) if j != i), key=lambda j: (-dot(a[i], k[j]).item(), j))[:hard]
            synth = []
            for m in range(draws["alpha"].shape[1]):
                al = draws["alpha"][i, m].item()
                h = al * k[negs[draws["pair_a"][i, m]]] + (1 - al) * k[negs[draws["pair_b"][i, m]]]
                synth.append(h / dot(h, h).sqrt())
            for m in range(draws["beta"].shape[1]):
                be = draws["beta"][i, m].item()
                h = be * a[i] + (1 - be) * k[negs[draws["neg"][i, m]]]
                synth.append(h / dot(h, h).sqrt())
        z = [s * dot(a[i], k[j]) for j in range(n)] + [s * dot(a[i], h) for h in synth]
        total = total - z[i] + torch.log(sum(torch.exp(v) for v in z))
    return total / n


@pytest.mark.parametrize("hard,mix,anchor_mix", [(3, 4, 2), (5, 6, 0), (20, 0, 3)])
def test_mochi_matches_loops(hard, mix, anchor_mix):
    out = rand_out(b=6, seed=5)
    torch.manual_seed(11)
    got = LOSSES.build("mochi", num_hard=hard, num_mix=mix, num_anchor_mix=anchor_mix)(out)
    torch.manual_seed(11)  # the same draws, in the loss's order: i2t then t2i
    h = min(hard, 5)
    d1 = draw_mixes(6, h, mix, anchor_mix, torch.device("cpu"))
    d2 = draw_mixes(6, h, mix, anchor_mix, torch.device("cpu"))
    x, y, s = out["image_emb"], out["text_emb"], out["logit_scale"]
    ref = (ref_mochi_direction(x, y, s, d1, h) + ref_mochi_direction(y, x, s, d2, h)) / 2
    check(got, ref, out)


def test_mochi_hand_example():
    # num_hard 1, num_mix 1, no anchor mix: the one synthetic negative of each anchor is its
    # hardest negative itself (a n + (1 - a) n = n), counted a second time in the denominator.
    # Row 0: S_0 = [1, 0, 0], hardest j != 0 is j = 1 (tie, lower index), logit 0:
    #   -1 + log(e + 1 + 1 + 1) = .7436684
    # Row 1: S_1 = [0, .6, .8], hardest j = 2 (.8): -.6 + log(1 + e^.6 + 2 e^.8) = 1.3841965; row 2 alike.
    # mean (both directions equal) = (.7436684 + 2 * 1.3841965) / 3 = 1.1706871
    loss = LOSSES.build("mochi", num_hard=1, num_mix=1, num_anchor_mix=0)
    assert loss(hand_out())["loss"].item() == pytest.approx(1.1706871, abs=1e-6)


def test_mochi_synthetic_negatives_make_the_loss_harder():
    out = rand_out(b=8, seed=6)
    plain = LOSSES.build("clip")(out)["loss"]
    assert LOSSES.build("mochi")(out)["loss"] > plain


# ----------------------------------------------------------------------------- m3col


def ref_m3col(out: dict, lam: float, perm: list[int], weight: float, mix_images: bool) -> torch.Tensor:
    x, y, s = out["image_emb"], out["text_emb"], out["logit_scale"]
    n = x.shape[0]
    eye = [[float(i == j) for j in range(n)] for i in range(n)]
    clip = (xent_rows(x, y, s, eye) + xent_rows(y, x, s, eye)) / 2
    a, b = (x, y) if mix_images else (y, x)
    mixed = []
    for i in range(n):
        m = lam * a[i] + (1 - lam) * a[perm[i]]
        mixed.append(m / dot(m, m).sqrt())
    soft = [[lam * (j == i) + (1 - lam) * (j == perm[i]) for j in range(n)] for i in range(n)]
    return clip + weight * xent_rows(mixed, [b[j] for j in range(n)], s, soft)


@pytest.mark.parametrize("modality", ["image", "text"])
def test_m3col_matches_loops(modality):
    out = rand_out(b=6, seed=7)
    torch.manual_seed(3)
    got = LOSSES.build("m3col", alpha=0.7, weight=0.5, modality=modality)(out)
    torch.manual_seed(3)
    lam, perm = m3col_module.draw_mixup(6, 0.7, torch.device("cpu"))
    check(got, ref_m3col(out, lam.item(), perm.tolist(), 0.5, modality == "image"), out)


def test_m3col_is_deterministic_given_the_torch_seed():
    out = rand_out(b=6, seed=8)
    torch.manual_seed(5)
    a = LOSSES.build("m3col", modality="both")(out)["loss"]
    torch.manual_seed(5)
    b = LOSSES.build("m3col", modality="both")(out)["loss"]
    c = LOSSES.build("m3col", modality="both")(out)["loss"]  # the generator moved on
    assert a.item() == b.item() and a.item() != c.item()


def test_m3col_hand_example(monkeypatch):
    # lam .5, perm [1, 2, 0]: m_i = (e_i + e_perm(i)) / sqrt 2; m_i . y_j (y of hand_out):
    #   m_0 -> [1, .6, .8]/sqrt2, targets .5 at 0 and 1: lse 1.6709533, -(.5(.7071068 - lse) + .5(.4242641 - lse)) = 1.1052679
    #   m_1 -> [0, 1.4, 1.4]/sqrt2, targets at 1 and 2: lse 1.8535124, term 1.8535124 - .9899495 = .8635629
    #   m_2 -> [1, .8, .6]/sqrt2, targets at 2 and 0: 1.1052679 (as m_0)
    #   L_mix = (1.1052679 + .8635629 + 1.1052679) / 3 = 1.0246996
    # L_clip = (-1 + log(e + 2) + 2 (-.6 + log(1 + e^.6 + e^.8))) / 3 = (.5514447 + 2 * 1.0189247) / 3 = .8630980
    # L = .8630980 + 1.0246996 = 1.8877976
    fixed = (torch.tensor(0.5, dtype=torch.float64), torch.tensor([1, 2, 0]))
    monkeypatch.setattr(m3col_module, "draw_mixup", lambda n, alpha, device: fixed)
    assert LOSSES.build("m3col")(hand_out())["loss"].item() == pytest.approx(1.8877976, abs=1e-6)


# ----------------------------------------------------------------------------- distill_kl, dclip


def teacher_out(out: dict, seed: int, width: int | None = None) -> dict:
    b, d = out["image_emb"].shape
    out["teacher_image_emb"] = unit(b, width or d, seed)
    out["teacher_text_emb"] = unit(b, width or d, seed + 1)
    out["teacher_logit_scale"] = torch.tensor(12.0, dtype=out["image_emb"].dtype)
    return out


def ref_distill(out: dict) -> torch.Tensor:
    x, y, s = out["image_emb"], out["text_emb"], out["logit_scale"]
    u, v, st = out["teacher_image_emb"], out["teacher_text_emb"], out["teacher_logit_scale"]
    n = x.shape[0]
    eye = [[float(i == j) for j in range(n)] for i in range(n)]

    def soft(a, b):  # teacher's row distributions softmax_j(st a_i.b_j)
        rows = []
        for i in range(n):
            e = [torch.exp(st * dot(a[i], b[j])) for j in range(n)]
            rows.append([e[j] / sum(e) for j in range(n)])
        return rows

    clip = (xent_rows(x, y, s, eye) + xent_rows(y, x, s, eye)) / 2
    distill = (xent_rows(x, y, s, soft(u, v)) + xent_rows(y, x, s, soft(v, u))) / 2
    return clip + distill


def test_distill_kl_matches_loops_with_a_wider_teacher():
    out = teacher_out(rand_out(seed=9), seed=10, width=9)
    check(LOSSES.build("distill_kl", teacher=None)(out), ref_distill(out), out)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
def test_distill_kl_matches_open_clip(dtype, tol):
    out = teacher_out(rand_out(b=16, d=8, seed=11), seed=12)
    out = {
        k: v.detach().to(dtype).requires_grad_(k in ("image_emb", "text_emb", "logit_scale"))
        for k, v in out.items()
    }
    ours = LOSSES.build("distill_kl", teacher=None)(out)
    contrastive, distill = oc.DistillClipLoss()(
        out["image_emb"], out["text_emb"], out["logit_scale"],
        out["teacher_image_emb"], out["teacher_text_emb"], out["teacher_logit_scale"],
    )  # fmt: skip
    torch.testing.assert_close(ours["loss_clip"], contrastive, rtol=tol, atol=tol)
    torch.testing.assert_close(ours["loss_distill"], distill, rtol=tol, atol=tol)
    keys = ("image_emb", "text_emb", "logit_scale")
    ga = torch.autograd.grad(ours["loss"], [out[k] for k in keys])
    gr = torch.autograd.grad(contrastive + distill, [out[k] for k in keys])
    for k, a, r in zip(keys, ga, gr):
        torch.testing.assert_close(a, r, rtol=tol, atol=tol, msg=lambda m, k=k: f"d/d{k}: {m}")


def test_distill_kl_reports_the_kl_which_is_zero_when_student_equals_teacher():
    out = rand_out(seed=13)
    out.update(teacher_image_emb=out["image_emb"].detach(), teacher_text_emb=out["text_emb"].detach())
    out["teacher_logit_scale"] = out["logit_scale"].detach()
    res = LOSSES.build("distill_kl", teacher=None)(out)
    assert abs(res["kl"].item()) < 1e-12
    assert res["loss_distill"].item() > 0  # the cross-entropy form keeps the teacher's entropy


def test_distill_kl_hand_example():
    # Teacher: image and text embeddings e1, e2, e3 and scale 1, so its logits are I and its rows
    # softmax(I_i) put e/(e+2) = .5761169 on i and 1/(e+2) = .2119416 elsewhere. Student S of hand_out:
    #   row 0: log softmax S_0 = [1 - 1.5514447, -1.5514447, -1.5514447] -> -sum p log q = .9753278
    #   row 1: lse 1.6189247, log softmax S_1 = [-1.6189247, -1.0189247, -.8189247] with p = [.2119, .5761, .2119]
    #          -> 1.1037013; row 2 the same.  L_distill = (.9753278 + 2 * 1.1037013) / 3 = 1.0609102
    # L_clip = .8630980 (see the m3col example); L = 1.9240082 (both directions equal: S, I symmetric)
    out = hand_out()
    eye = torch.eye(3, dtype=torch.float64)
    out.update(
        teacher_image_emb=eye,
        teacher_text_emb=eye,
        teacher_logit_scale=torch.tensor(1.0, dtype=torch.float64),
    )
    assert LOSSES.build("distill_kl", teacher=None)(out)["loss"].item() == pytest.approx(1.9240082, abs=1e-6)


def ref_dclip(out: dict, weight: float) -> torch.Tensor:
    x, y, s = out["image_emb"], out["text_emb"], out["logit_scale"]
    u, v = out["teacher_image_emb"], out["teacher_text_emb"]
    n = x.shape[0]
    eye = [[float(i == j) for j in range(n)] for i in range(n)]

    def cos(a, b):
        return dot(a, b) / (dot(a, a) * dot(b, b)).sqrt()

    clip = (xent_rows(x, y, s, eye) + xent_rows(y, x, s, eye)) / 2
    dist = sum((1 - cos(x[i], u[i])) + (1 - cos(y[i], v[i])) for i in range(n)) / (2 * n)
    return clip + weight * dist


def test_dclip_matches_loops():
    out = teacher_out(rand_out(seed=14), seed=15)
    out["teacher_image_emb"] = out["teacher_image_emb"] * 3  # cosine: the teacher's norm does not matter
    check(LOSSES.build("dclip", teacher=None, weight=0.7)(out), ref_dclip(out, 0.7), out)


def test_dclip_hand_example_and_width_check():
    # Teacher images = student images (cos 1); teacher texts e1, e2, e3: cos(y_i, e_i) = [1, .6, .6].
    # L_cos = (0 + (0 + .4 + .4) / 3) / 2 = .1333333;  L = L_clip .8630980 + .1333333 = .9964314
    out = hand_out()
    out.update(teacher_image_emb=out["image_emb"], teacher_text_emb=torch.eye(3, dtype=torch.float64))
    assert LOSSES.build("dclip", teacher=None)(out)["loss"].item() == pytest.approx(0.9964314, abs=1e-6)
    with pytest.raises(ValueError, match="embed_dim"):
        LOSSES.build("dclip", teacher=None)(teacher_out(rand_out(seed=16), seed=17, width=4))


def test_teacher_module_embeds_the_batch():
    torch.manual_seed(1)
    student, teacher = Tiny(), Tiny()
    batch = {"image": torch.randn(5, 4), "text": torch.randn(5, 3), "key": list("abcde")}
    out = student(batch)
    with torch.no_grad():
        t = teacher(batch)
    given = {
        **out,
        "teacher_image_emb": t["image_emb"],
        "teacher_text_emb": t["text_emb"],
        "teacher_logit_scale": t["logit_scale"],
    }
    for name in ("distill_kl", "dclip"):
        a = LOSSES.build(name, teacher=teacher)(out, batch)["loss"]
        b = LOSSES.build(name, teacher=None)(given)["loss"]
        torch.testing.assert_close(a, b)
    assert not any(p.requires_grad for p in teacher.parameters())
    assert "teacher" not in "".join(LOSSES.build("dclip", teacher=teacher).state_dict())
    with pytest.raises(KeyError, match="teacher_image_emb"):
        LOSSES.build("dclip", teacher=None)(out)
    assert math.isfinite(LOSSES.build("dclip", teacher=teacher)(out, batch)["loss"].item())
