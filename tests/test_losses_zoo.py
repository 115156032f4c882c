"""The objective zoo against slow, loop-by-loop references and hand-worked 3x3 examples.

Registry-wide properties (finite scalars, gradients, invariances, state_dict) are in
test_losses.py and cover every loss here as well.
"""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
import torch.nn.functional as F

from clipkit.losses import LOSSES, embedding_stats
from clipkit.losses.stats import alignment, cross_uniformity, modality_gap, uniformity

KEYS = ("image_emb", "text_emb", "logit_scale")


def rand_out(b: int = 6, d: int = 5, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(b, d, generator=g, dtype=torch.float64), dim=-1)
    y = F.normalize(torch.randn(b, d, generator=g, dtype=torch.float64), dim=-1)
    s = torch.tensor(3.0 + 2 * torch.rand(1, generator=g).item(), dtype=torch.float64)
    return {
        "image_emb": x.requires_grad_(),
        "text_emb": y.requires_grad_(),
        "logit_scale": s.requires_grad_(),
    }


def dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return sum(a[k] * b[k] for k in range(a.shape[0]))


def log(v):
    return torch.log(v) if isinstance(v, torch.Tensor) else math.log(v)


def check(got: dict, ref_value: torch.Tensor, out: dict, keys=KEYS, tol: float = 1e-5) -> None:
    """Value and gradients (w.r.t. ``keys`` of ``out``) of got["loss"] equal the reference's."""
    torch.testing.assert_close(got["loss"], ref_value, rtol=tol, atol=tol)
    ins = [out[k] for k in keys]
    ga = torch.autograd.grad(got["loss"], ins, allow_unused=True, retain_graph=True)
    gr = torch.autograd.grad(ref_value, ins, allow_unused=True)
    for k, a, r in zip(keys, ga, gr):
        a = torch.zeros_like(out[k]) if a is None else a
        r = torch.zeros_like(out[k]) if r is None else r
        torch.testing.assert_close(a, r, rtol=tol, atol=tol, msg=lambda m, k=k: f"d/d{k}: {m}")


def hand_out() -> dict[str, torch.Tensor]:
    # Images e1, e2, e3; texts (1,0,0), (0,.6,.8), (0,.8,.6); scale 1. Then
    # S = img @ txt.T = [[1, 0, 0], [0, .6, .8], [0, .8, .6]] (symmetric, so i2t = t2i).
    img = torch.eye(3, dtype=torch.float64)
    txt = torch.tensor([[1, 0, 0], [0, 0.6, 0.8], [0, 0.8, 0.6]], dtype=torch.float64)
    return {"image_emb": img, "text_emb": txt, "logit_scale": torch.tensor(1.0, dtype=torch.float64)}


# ----------------------------------------------------------------------------- dcl / dclw


def ref_dcl(out: dict, scale, weights=None) -> torch.Tensor:
    x, y = out["image_emb"], out["text_emb"]
    n = x.shape[0]
    w = weights or [1.0] * n

    def direction(a, b):
        total = 0
        for i in range(n):
            negatives = sum(torch.exp(scale * dot(a[i], b[j])) for j in range(n) if j != i)
            total = total - w[i] * scale * dot(a[i], b[i]) + torch.log(negatives)
        return total / n

    return (direction(x, y) + direction(y, x)) / 2


def vmf_weights(out: dict, sigma: float) -> list:
    x, y = out["image_emb"], out["text_emb"]
    n = x.shape[0]
    e = [torch.exp(dot(x[i], y[i]) / sigma) for i in range(n)]
    mean = sum(e) / n
    return [2 - e[i] / mean for i in range(n)]


@pytest.mark.parametrize("temperature", [None, 0.2])
def test_dcl_matches_loops(temperature):
    out = rand_out(seed=1)
    scale = out["logit_scale"] if temperature is None else 1 / temperature
    check(LOSSES.build("dcl", temperature=temperature)(out), ref_dcl(out, scale), out)


@pytest.mark.parametrize("sigma", [0.5, 2.0])
def test_dclw_matches_loops(sigma):
    out = rand_out(seed=2)
    ref = ref_dcl(out, out["logit_scale"], vmf_weights(out, sigma))
    check(LOSSES.build("dclw", sigma=sigma)(out), ref, out)


def test_dcl_hand_example():
    # Row i: -S_ii + log sum_{j != i} e^{S_ij}
    #   row 0: -1 + log(1 + 1) = -0.3068528;  rows 1, 2: -0.6 + log(1 + e^0.8) = 0.5711007
    #   mean (both directions equal) = 0.2784495
    assert LOSSES.build("dcl")(hand_out())["loss"].item() == pytest.approx(0.2784495, abs=1e-6)


def test_dclw_hand_example():
    # sigma .5: e^{pos/sigma} = e^2, e^1.2, e^1.2, mean 4.6764302; w = 2 - e/mean = .4199365, 1.2900317 (x2)
    # rows: -.4199365 + log 2 = .2732106;  -1.2900317 * .6 + 1.1711007 = .3970816 (x2);  mean .3557913
    assert LOSSES.build("dclw")(hand_out())["loss"].item() == pytest.approx(0.3557913, abs=1e-6)


def test_dcl_needs_a_negative():
    out = rand_out(b=1)
    with pytest.raises(ValueError, match="at least 2"):
        LOSSES.build("dcl")(out)


# ----------------------------------------------------------------------------- cwcl


def ref_cwcl(out: dict, u: torch.Tensor) -> torch.Tensor:
    x, y, s = out["image_emb"], out["text_emb"], out["logit_scale"]
    n = x.shape[0]
    cos = [[dot(u[i], u[j]) / (dot(u[i], u[i]) * dot(u[j], u[j])).sqrt() for j in range(n)] for i in range(n)]
    w = [[cos[i][j] / 2 + 0.5 for j in range(n)] for i in range(n)]

    def direction(a, b):
        total = 0
        for i in range(n):
            logits = [s * dot(a[i], b[j]) for j in range(n)]
            lse = torch.log(sum(torch.exp(v) for v in logits))
            total = total - sum(w[i][j] / sum(w[i]) * (logits[j] - lse) for j in range(n))
        return total / n

    return (direction(x, y) + direction(y, x)) / 2


@pytest.mark.parametrize("side", ["image", "text"])
def test_cwcl_matches_loops(side):
    out = rand_out(seed=3)
    u = torch.randn(6, 7, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    out[f"{side}_tower_features"] = u
    check(LOSSES.build("cwcl", targets_from=side)(out), ref_cwcl(out, u), out)


def test_cwcl_centered_matches_loops_on_centered_features():
    out = rand_out(seed=7)
    u = torch.rand(6, 5, generator=torch.Generator().manual_seed(8), dtype=torch.float64) + 1.0  # all > 0
    centered = u - sum(u[i] for i in range(6)) / 6
    check(LOSSES.build("cwcl", center=True)(out, {"image_features": u}), ref_cwcl(out, centered), out)
    plain = LOSSES.build("cwcl")(out, {"image_features": u})["loss"]
    assert not torch.allclose(plain, LOSSES.build("cwcl", center=True)(out, {"image_features": u})["loss"])


def test_cwcl_hand_example():
    # Tower features (1,0), (0,1), (1,0): w = cos/2 + 1/2 = [[1,.5,1],[.5,1,.5],[1,.5,1]], targets = rows / sums.
    # log softmax of S rows: row 0 [1,0,0] -> lse log(e + 2) = 1.5514448; rows 1, 2 -> lse log(1 + e^.6 + e^.8)
    # row 0: -(.4(1-1.5514448) + .2(-1.5514448) + .4(-1.5514448)) = 1.1514448, likewise rows 1, 2;
    # mean over rows (both directions equal) = 1.1630980
    out = hand_out()
    out["image_tower_features"] = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]], dtype=torch.float64)
    assert LOSSES.build("cwcl")(out)["loss"].item() == pytest.approx(1.1630980, abs=1e-6)


def test_cwcl_uses_the_feature_cache_and_says_what_is_missing():
    out = rand_out(seed=5)
    u = torch.randn(6, 4, dtype=torch.float64)
    from_cache = LOSSES.build("cwcl")(out, {"image_features": u})["loss"]
    torch.testing.assert_close(from_cache, ref_cwcl(out, u))
    with pytest.raises(KeyError, match=r"out\['image_tower_features'\].*locked=true"):
        LOSSES.build("cwcl")(out, {"idx": torch.arange(6)})
    with pytest.raises(KeyError, match=r"out\['text_tower_features'\]"):
        LOSSES.build("cwcl", targets_from="text")(out)
    with pytest.raises(ValueError, match="targets_from"):
        LOSSES.build("cwcl", targets_from="audio")


def test_cwcl_is_clip_when_the_tower_sees_orthogonal_opposites():
    # u_j = -u_i for all i != j is impossible beyond 2 samples; with 2 samples w = I and CWCL = CLIP.
    out = rand_out(b=2, seed=6)
    out["image_tower_features"] = torch.tensor([[1.0, 0.0], [-1.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(LOSSES.build("cwcl")(out)["loss"], LOSSES.build("clip")(out)["loss"])


# ----------------------------------------------------------------------------- clip_unif_align + stats


def ref_unif_align(out: dict, wa: float, wu: float, wx: float, t: float = 2.0) -> torch.Tensor:
    x, y, s = out["image_emb"], out["text_emb"], out["logit_scale"]
    n = x.shape[0]

    def ce(a, b):
        return sum(-s * dot(a[i], b[i]) + torch.log(sum(torch.exp(s * dot(a[i], b[j])) for j in range(n)))
                   for i in range(n)) / n  # fmt: skip

    def sq(a, b):
        return dot(a - b, a - b)

    def unif(a, b):
        return torch.log(sum(torch.exp(-t * sq(a[i], b[j])) for i in range(n) for j in range(n) if i != j)
                         / (n * (n - 1)))  # fmt: skip

    align = sum(sq(x[i], y[i]) for i in range(n)) / n
    return (ce(x, y) + ce(y, x)) / 2 + wa * align + wu * (unif(x, x) + unif(y, y)) / 2 + wx * unif(x, y)


@pytest.mark.parametrize("wa,wu,wx", [(1.0, 1.0, 0.0), (0.5, 2.0, 0.7)])
def test_clip_unif_align_matches_loops(wa, wu, wx):
    out = rand_out(seed=7)
    loss = LOSSES.build("clip_unif_align", align_weight=wa, uniform_weight=wu, cross_uniform_weight=wx)
    check(loss(out), ref_unif_align(out, wa, wu, wx), out)


def test_clip_unif_align_hand_example():
    # clip (s=1): row 0 -log(e/(e+2)) = .5514448; rows 1, 2: -log(e^.6/(1+e^.6+e^.8)) = 1.0189266; mean .8630980
    # align: 0 + (.16+.64) + (.64+.16) over 3 = .5333333
    # uniform(img): every pair at squared distance 2 -> log e^-4 = -4
    # uniform(txt): pairs (0,1), (0,2) at 2, (1,2) at .08 -> log((4e^-4 + 2e^-.16)/6) = -1.2165234
    # L_CUA = .8630980 + .5333333 + (-4 - 1.2165234)/2 = -1.2118303
    # xuniform: the 6 off-diagonal image-text pairs -> -1.8202408, L_CUAXU = -3.0320711
    got = LOSSES.build("clip_unif_align")(hand_out())
    assert got["loss"].item() == pytest.approx(-1.2118303, abs=1e-6)
    assert got["loss_clip"].item() == pytest.approx(0.8630980, abs=1e-6)
    got = LOSSES.build("clip_unif_align", cross_uniform_weight=1.0)(hand_out())
    assert got["loss"].item() == pytest.approx(-3.0320711, abs=1e-6)


def test_embedding_stats_hand_example():
    out = hand_out()
    stats = embedding_stats(out["image_emb"], out["text_emb"])
    # centroids (1,1,1)/3 and (1, 1.4, 1.4)/3: gap = sqrt(.32)/3 = .1885618
    assert stats == pytest.approx(
        {"align": 0.5333333, "uniform_img": -4.0, "uniform_txt": -1.2165234, "modality_gap": 0.1885618},
        abs=1e-6,
    )
    assert all(isinstance(v, float) for v in stats.values())
    assert math.isnan(embedding_stats(out["image_emb"][:1], out["text_emb"][:1])["uniform_img"])


def test_stats_functions_match_loops():
    out = rand_out(seed=8)
    x, y = out["image_emb"].detach(), out["text_emb"].detach()
    n = x.shape[0]
    sq = [[float(((x[i] - y[j]) ** 2).sum()) for j in range(n)] for i in range(n)]
    xu = math.log(sum(math.exp(-2 * sq[i][j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1)))
    assert float(cross_uniformity(x, y)) == pytest.approx(xu, rel=1e-9)
    assert float(alignment(x, y)) == pytest.approx(sum(sq[i][i] for i in range(n)) / n, rel=1e-9)
    assert float(uniformity(x)) == pytest.approx(float(cross_uniformity(x, x)), rel=1e-9)
    gap = math.sqrt(sum((float(x[:, k].mean()) - float(y[:, k].mean())) ** 2 for k in range(x.shape[1])))
    assert float(modality_gap(x, y)) == pytest.approx(gap, rel=1e-9)


# ----------------------------------------------------------------------------- sogclr / isogclr


class RefGlobal:
    """SogCLR / iSogCLR bookkeeping in plain Python floats, one sample at a time."""

    def __init__(self, gamma, tau, rho=0.0, lr=0.0, beta=0.0, clip=math.inf, tau_min=0.0, tau_max=math.inf):
        self.gamma, self.rho, self.lr, self.beta, self.clip = gamma, rho, lr, beta, clip
        self.tau0, self.tau_min, self.tau_max = tau, tau_min, tau_max
        self.u, self.tau, self.m = {}, {}, {}

    def step(self, out: dict, ids: list[int], individual: bool):
        """(value, gradient-carrier) of the loss; updates u (and tau, m when individual)."""
        x, y = out["image_emb"], out["text_emb"]
        n = x.shape[0]
        value, carrier = 0.0, 0.0
        for side, (a, b) in (("img", (x, y)), ("txt", (y, x))):
            for i in range(n):
                key = (side, ids[i])
                tau = self.tau.get(key, self.tau0)
                d = [dot(a[i], b[j]) - dot(a[i], b[i]) for j in range(n) if j != i]  # tensors
                dv = [v.item() for v in d]  # the same as floats
                g = sum(math.exp(v / tau) for v in dv) / (n - 1)
                u = g if key not in self.u else (1 - self.gamma) * self.u[key] + self.gamma * g
                self.u[key] = u
                value += tau * (math.log(g) + self.rho) / n
                # d/dw of tau * g(w) / u is SogCLR's tau / u * grad g, with u held constant
                carrier = carrier + tau * sum(torch.exp(v / tau) for v in d) / (n - 1) / u / n
                if individual:
                    weighted = sum(math.exp(v / tau) * v / tau for v in dv) / ((n - 1) * u)
                    grad = math.log(u) + self.rho - weighted
                    grad = max(-self.clip, min(self.clip, grad))
                    self.m[key] = (1 - self.beta) * self.m.get(key, 0.0) + self.beta * grad
                    self.tau[key] = max(self.tau_min, min(self.tau_max, tau - self.lr * self.m[key]))
        return value, carrier


def check_global(got: dict, value: float, carrier: torch.Tensor, out: dict) -> None:
    # 1e-6: the temperatures are stored in float32 buffers
    assert got["loss"].item() == pytest.approx(value, rel=1e-6, abs=1e-9)
    ins = [out["image_emb"], out["text_emb"]]
    for a, r in zip(torch.autograd.grad(got["loss"], ins), torch.autograd.grad(carrier, ins)):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-7)


def test_sogclr_matches_loops_over_steps():
    loss = LOSSES.build("sogclr", num_samples=20, temperature=0.1, gamma=0.7)
    ref = RefGlobal(gamma=0.7, tau=0.1)
    for step, ids in enumerate([[3, 7, 1, 12, 0], [7, 3, 5, 19, 1], [12, 5, 2, 3, 7]]):
        out = rand_out(b=5, seed=10 + step)
        got = loss(out, {"idx": torch.tensor(ids)})
        check_global(got, *ref.step(out, ids, individual=False), out)
        for (side, i), u in ref.u.items():
            assert getattr(loss, f"log_u_{side}")[i].item() == pytest.approx(math.log(u), rel=1e-6), (side, i)
    assert torch.isneginf(loss.log_u_img[[4, 6, 8]]).all()  # never seen


def test_isogclr_matches_loops_over_steps():
    kw = {
        "gamma": 0.6,
        "rho": 2.0,
        "tau_init": 0.2,
        "tau_min": 0.05,
        "tau_max": 0.5,
        "tau_lr": 0.05,
        "tau_beta": 0.7,
    }
    loss = LOSSES.build("isogclr", num_samples=20, tau_grad_clip=3.0, **kw)
    ref = RefGlobal(0.6, 0.2, rho=2.0, lr=0.05, beta=0.7, clip=3.0, tau_min=0.05, tau_max=0.5)
    for step, ids in enumerate([[3, 7, 1, 12, 0], [7, 3, 5, 19, 1], [12, 5, 2, 3, 7], [3, 7, 1, 12, 5]]):
        out = rand_out(b=5, seed=20 + step)
        got = loss(out, {"idx": torch.tensor(ids)})
        check_global(got, *ref.step(out, ids, individual=True), out)
        for (side, i), tau in ref.tau.items():
            assert getattr(loss, f"tau_{side}")[i].item() == pytest.approx(tau, rel=1e-6), (side, i)
            assert getattr(loss, f"tau_m_{side}")[i].item() == pytest.approx(
                ref.m[side, i], rel=1e-5, abs=1e-7
            )
    assert len({round(v, 6) for v in ref.tau.values()}) > 3  # temperatures did individualise


def test_isogclr_temperature_gradient_is_the_objective_derivative():
    # On a first visit u = g, so the tau step uses the exact d/dtau of tau (log g(tau) + rho).
    out = rand_out(b=4, seed=30)
    loss = LOSSES.build("isogclr", num_samples=8, rho=1.5, tau_init=0.3, tau_lr=0.01, tau_beta=1.0, tau_grad_clip=1e9,
                        tau_min=1e-6, tau_max=1e6)  # fmt: skip
    loss({k: v.detach() for k, v in out.items()}, {"idx": torch.arange(4)})
    sim = (out["image_emb"] @ out["text_emb"].T).detach()
    for i in range(4):
        tau = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
        d = torch.stack([sim[i, j] - sim[i, i] for j in range(4) if j != i])
        (grad,) = torch.autograd.grad(tau * (torch.log(torch.exp(d / tau).mean()) + 1.5), tau)
        assert loss.tau_img[i].item() == pytest.approx(0.3 - 0.01 * grad.item(), rel=1e-6)


def test_sogclr_hand_example():
    # tau .5; image anchors: d_0 = (-1, -1) -> g = e^-2, tau log g = -1;
    # d_1 = d_2 = (-.6, .2) -> g = (e^-1.2 + e^.4)/2 = .8965095, tau log g = -.0546277;
    # mean -.3697488; text anchors equal (S symmetric): loss = -.7394976
    loss = LOSSES.build("sogclr", num_samples=3, temperature=0.5)
    assert loss(hand_out(), {"idx": torch.arange(3)})["loss"].item() == pytest.approx(-0.7394976, abs=1e-6)


def test_isogclr_hand_example():
    # tau .5, rho 1: per anchor tau (log g + rho) = -.5, .4453723, .4453723; mean .1302512, x2 = .2605024.
    # tau gradient G = log u + rho - sum_j e^{z_j} z_j / ((N-1) u) with u = g on a first visit:
    #   anchor 0: z = (-2, -2): G = -2 + 1 + 2 = 1 -> tau = .5 - .1 * 1 = .4 (lr .1, beta 1)
    #   anchors 1, 2: z = (-1.2, .4): G = -.1092549 + 1 - .1312310 = .7595241 -> tau = .4240476
    loss = LOSSES.build("isogclr", num_samples=3, rho=1.0, tau_init=0.5, tau_lr=0.1, tau_beta=1.0)
    got = loss(hand_out(), {"idx": torch.arange(3)})
    assert got["loss"].item() == pytest.approx(0.2605024, abs=1e-6)
    torch.testing.assert_close(loss.tau_img, torch.tensor([0.4, 0.4240476, 0.4240476]), atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", ["sogclr", "isogclr"])
def test_state_resumes_from_a_checkpoint(name):
    def grads(loss: torch.nn.Module, seed: int, ids: list[int]) -> tuple[torch.Tensor, ...]:
        out = rand_out(b=4, seed=seed)
        got = loss(out, {"idx": torch.tensor(ids)})["loss"]
        return (got.detach(), *torch.autograd.grad(got, [out["image_emb"], out["text_emb"]]))

    loss = LOSSES.build(name, num_samples=10)
    grads(loss, 40, [0, 1, 2, 3])
    grads(loss, 41, [2, 3, 4, 5])
    buf = io.BytesIO()
    torch.save(loss.state_dict(), buf)
    buf.seek(0)
    resumed = LOSSES.build(name, num_samples=10)
    resumed.load_state_dict(torch.load(buf))
    after_resume, continued = grads(resumed, 42, [5, 0, 2, 9]), grads(loss, 42, [5, 0, 2, 9])
    for a, b in zip(after_resume, continued):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    fresh = grads(LOSSES.build(name, num_samples=10), 42, [5, 0, 2, 9])
    assert not torch.allclose(fresh[1], continued[1])  # the state does change the gradient


@pytest.mark.parametrize("name", ["sogclr", "isogclr"])
def test_bad_indices_are_refused_clearly(name):
    out = rand_out(b=3)
    loss = LOSSES.build(name, num_samples=5)
    with pytest.raises(ValueError, match=r"outside \[0, num_samples=5\)"):
        loss(out, {"idx": torch.tensor([0, 1, 5])})
    with pytest.raises(ValueError, match="-1 means the sample has no index"):
        loss(out, {"idx": torch.tensor([0, -1, 2])})
    with pytest.raises(KeyError, match=r"batch\['idx'\]"):
        loss(out, {"key": ["a", "b", "c"]})
    with pytest.raises(KeyError, match="no batch was passed"):
        loss(out)
    assert torch.isneginf(loss.log_u_img).all()  # nothing was written by the refused calls


@pytest.mark.parametrize("name", ["sogclr", "isogclr"])
def test_eval_mode_reads_but_never_writes_state(name):
    loss = LOSSES.build(name, num_samples=6)
    out, batch = rand_out(b=4, seed=50), {"idx": torch.tensor([0, 1, 2, 3])}
    loss(out, batch)
    before = copy.deepcopy(loss.state_dict())
    loss.eval()
    loss(rand_out(b=4, seed=51), batch)
    for k, v in loss.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_a_sample_twice_in_a_batch_is_written_from_its_first_row():
    loss = LOSSES.build("sogclr", num_samples=6, temperature=0.5)
    out = rand_out(b=4, seed=52)
    loss(out, {"idx": torch.tensor([2, 4, 2, 1])})
    sim = (out["image_emb"] @ out["text_emb"].T).detach()
    g = sum(math.exp((sim[0, j] - sim[0, 0]).item() / 0.5) for j in (1, 2, 3)) / 3  # row 0, not row 2
    assert loss.log_u_img[2].item() == pytest.approx(math.log(g), rel=1e-6)


# ----------------------------------------------------------------------------- mv_infonce


def ref_mv(out: dict, groups: list[int]) -> torch.Tensor:
    x, y, s = out["image_emb"], out["text_emb"], out["logit_scale"]
    n = x.shape[0]
    e = [[torch.exp(s * dot(x[r], y[c])) for c in range(n)] for r in range(n)]
    total = 0
    for g in sorted(set(groups)):
        members = [r for r in range(n) if groups[r] == g]
        positives = sum(e[r][c] for r in members for c in members)
        energy = sum(e[r][c] for r in members for c in range(n)) + sum(
            e[r][c] for c in members for r in range(n)
        )
        total = total - torch.log(2 * positives / energy)
    return total / len(set(groups))


@pytest.mark.parametrize("groups", [[5, 5, 7, 9, 9, 9], [0, 1, 2, 3, 4, 5], [4, 4, 4, 4, 4, 8]])
def test_mv_infonce_matches_loops(groups):
    out = rand_out(seed=60)
    got = LOSSES.build("mv_infonce")(out, {"idx": torch.tensor(groups)})
    check(got, ref_mv(out, groups), out)
    assert got["instances"].item() == len(set(groups))


def test_mv_infonce_reads_the_group_key_and_refuses_missing_ids():
    out = rand_out(seed=61)
    groups = [1, 1, 2, 2, 3, 3]
    got = LOSSES.build("mv_infonce", group_key="group")(out, {"group": torch.tensor(groups)})
    torch.testing.assert_close(got["loss"], ref_mv(out, groups))
    with pytest.raises(ValueError, match="-1"):
        LOSSES.build("mv_infonce")(out, {"idx": torch.tensor([0, -1, 1, 2, 3, 4])})


def test_mv_infonce_groups_rows_by_caption_tokens():
    out = rand_out(seed=62)
    tokens = torch.tensor([[5, 9, 0], [7, 1, 0], [5, 9, 0], [3, 3, 3], [7, 1, 0], [9, 5, 0]])
    groups = [0, 1, 0, 2, 1, 3]  # equal token rows are one instance
    got = LOSSES.build("mv_infonce", group_key="text")(out, {"text": tokens})
    check(got, ref_mv(out, groups), out)
    assert got["instances"].item() == 4


def test_mv_infonce_hand_example():
    # groups (0, 0, 1): instance A = rows {0, 1}, B = {2}; S row/column sums (S symmetric):
    #   R_0 = e + 2 = 4.7182818, R_1 = R_2 = 1 + e^.6 + e^.8 = 5.0476595
    # A: positives e^1 + e^0 + e^0 + e^.6 = 6.5404006; energy R_0 + R_1 + C_0 + C_1 = 19.5318831
    #    L_A = -log(2 * 6.5404006 / 19.5318831) = .4009026
    # B: positives e^.6 = 1.8221188; energy 2 R_2 = 10.0953195; L_B = 1.0189247;  mean .7099136
    got = LOSSES.build("mv_infonce")(hand_out(), {"idx": torch.tensor([0, 0, 1])})
    assert got["loss"].item() == pytest.approx(0.7099136, abs=1e-6)
