"""Each loss of losses.py against a naive loop or an explicit formula; GradNorm on a toy problem."""
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from losses import (
    GradNorm,
    clothing_alignment_loss,
    compute_losses,
    hsic,
    info_nce,
    multi_positive_nce,
    same_rows,
    triplet_loss,
)


def naive_nce_rows(sim, positives, tau):
    """Loop form of the multi-positive InfoNCE over the rows of a list-of-lists matrix."""
    terms = []
    for i, row in enumerate(sim):
        pos = [j for j in range(len(row)) if positives[i][j]]
        if not pos:
            continue
        denom = sum(math.exp(s / tau) for s in row)
        terms.append(-sum(math.log(math.exp(row[j] / tau) / denom) for j in pos) / len(pos))
    return sum(terms) / len(terms)


def test_multi_positive_nce_with_one_positive_is_cross_entropy():
    logits = torch.randn(5, 7)
    target = torch.tensor([0, 3, 6, 2, 2])
    positives = F.one_hot(target, 7).bool()
    assert torch.allclose(multi_positive_nce(logits, positives), F.cross_entropy(logits, target), atol=1e-6)


def test_info_nce_matches_loop_with_identity_positives():
    torch.manual_seed(0)
    sim = torch.randn(6, 6).tanh()
    pids = torch.tensor([0, 0, 1, 2, 2, 2])
    tau = 0.1
    pos = (pids[:, None] == pids[None, :]).tolist()
    want = (naive_nce_rows(sim.tolist(), pos, tau) + naive_nce_rows(sim.T.tolist(), pos, tau)) / 2
    assert info_nce(sim, pids, pids, tau).item() == pytest.approx(want, rel=1e-5)


def test_info_nce_same_identity_is_pulled_not_pushed():
    # text 0 and image 1 share identity 0: the gradient must raise their similarity
    sim = torch.tensor([[0.9, 0.5, -0.5], [0.5, 0.9, -0.5], [-0.5, -0.5, 0.9]], requires_grad=True)
    pids = torch.tensor([0, 0, 1])
    (aware,) = torch.autograd.grad(info_nce(sim, pids, pids, 0.05), sim)
    (naive,) = torch.autograd.grad(info_nce(sim, torch.arange(3), torch.arange(3), 0.05), sim)
    assert aware[0, 1] < 0 and aware[1, 0] < 0  # descent increases s_01
    assert naive[0, 1] > 0  # the paper's literal Eq. 3 treats it as a negative


def test_clothing_alignment_matches_loop_and_uses_the_mask():
    torch.manual_seed(1)
    v, t = torch.randn(5, 8), torch.randn(5, 8)
    tau = 0.2
    sim = (F.normalize(v, dim=-1) @ F.normalize(t, dim=-1).T).tolist()
    eye = torch.eye(5, dtype=torch.bool)
    sim_t = [list(r) for r in zip(*sim)]
    want = (naive_nce_rows(sim, eye.tolist(), tau) + naive_nce_rows(sim_t, eye.tolist(), tau)) / 2
    assert clothing_alignment_loss(v, t, tau).item() == pytest.approx(want, rel=1e-5)
    # samples 0 and 1 share an outfit: the mask makes them positives of each other
    mask = eye.clone()
    mask[0, 1] = mask[1, 0] = True
    want_mask = (naive_nce_rows(sim, mask.tolist(), tau) + naive_nce_rows(sim_t, mask.T.tolist(), tau)) / 2
    assert clothing_alignment_loss(v, t, tau, mask).item() == pytest.approx(want_mask, rel=1e-5)


def test_same_rows_finds_identical_texts():
    ids = torch.tensor([[101, 5, 102, 0], [101, 6, 102, 0], [101, 5, 102, 0]])
    assert same_rows(ids).tolist() == [[True, False, True], [False, True, False], [True, False, True]]


def test_hsic_linear_equals_explicit_trace_and_cross_covariance():
    torch.manual_seed(2)
    a, b = torch.randn(20, 4, dtype=torch.float64), torch.randn(20, 3, dtype=torch.float64)
    n = 20
    h = np.eye(n) - np.ones((n, n)) / n
    k, l = a.numpy() @ a.numpy().T, b.numpy() @ b.numpy().T
    want = np.trace(k @ h @ l @ h) / (n - 1) ** 2
    assert hsic(a, b).item() == pytest.approx(want, rel=1e-10)
    cross_cov = np.cov(a.numpy().T, b.numpy().T)[:4, 4:]  # unbiased cross-covariance (4, 3)
    assert hsic(a, b).item() == pytest.approx((cross_cov**2).sum(), rel=1e-10)


def test_hsic_rbf_matches_loop():
    torch.manual_seed(3)
    a, b = torch.randn(7, 2, dtype=torch.float64), torch.randn(7, 3, dtype=torch.float64)

    def gram(x):
        d2 = [[float(((x[i] - x[j]) ** 2).sum()) for j in range(len(x))] for i in range(len(x))]
        sigma2 = float(np.median([d2[i][j] for i in range(len(x)) for j in range(len(x)) if i != j]))
        return np.exp(-np.array(d2) / (2 * sigma2))

    h = np.eye(7) - 1 / 7
    want = np.trace(gram(a) @ h @ gram(b) @ h) / 36
    assert hsic(a, b, kernel="rbf").item() == pytest.approx(want, rel=1e-8)


def test_hsic_near_zero_when_independent_and_positive_when_dependent():
    g = torch.Generator().manual_seed(4)
    a = torch.randn(400, 4, generator=g)
    independent = torch.randn(400, 4, generator=g)
    linear = a @ torch.randn(4, 4, generator=g) + 0.1 * torch.randn(400, 4, generator=g)
    assert hsic(a, independent) < 0.1 * hsic(a, linear)
    assert hsic(a, linear) > 1.0
    # b = a^2 has zero covariance with a: only the RBF kernel sees the dependence
    x = torch.randn(400, 1, generator=g)
    y = torch.randn(400, 1, generator=g)
    squared = x**2
    assert hsic(x, squared, "rbf") > 10 * hsic(x, y, "rbf")
    assert hsic(x, squared, "rbf") > 0.01
    assert hsic(x, y, "rbf") < 0.005


def test_hsic_rejects_unknown_kernel():
    with pytest.raises(ValueError, match="linear"):
        hsic(torch.randn(4, 2), torch.randn(4, 2), kernel="gauss")


@pytest.mark.parametrize("squared", [True, False])
def test_triplet_batch_hard_matches_brute_force(squared):
    """Eq. 4 with squared distances (as written), and with the distances themselves."""
    torch.manual_seed(5)
    feats = torch.randn(9, 5)
    pids = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 3])  # identity 3 has no positive: not an anchor
    margin = 0.5
    d = lambda i, j: float((feats[i] - feats[j]).norm()) ** (2 if squared else 1)  # noqa: E731
    terms = []
    for a in range(9):
        pos = [p for p in range(9) if pids[p] == pids[a] and p != a]
        neg = [n for n in range(9) if pids[n] != pids[a]]
        if not pos:
            continue
        # brute force over all (p, n): the hardest triplet gives the largest hinge
        hinge = max(d(a, p) - d(a, n) + margin for p in pos for n in neg)
        terms.append(max(hinge, 0.0))
    assert triplet_loss(feats, pids, margin, squared).item() == pytest.approx(sum(terms) / len(terms), rel=1e-5)


def test_triplet_without_valid_anchor_is_zero_with_grad():
    feats = torch.randn(3, 4, requires_grad=True)
    loss = triplet_loss(feats, torch.tensor([0, 1, 2]), 0.3)
    loss.backward()
    assert loss.item() == 0.0 and feats.grad is not None


def toy_problem(seed=0):
    """Two regression tasks on a shared layer; task b's loss is 100x task a's."""
    torch.manual_seed(seed)
    shared = nn.Linear(8, 16)
    heads = nn.ModuleList([nn.Linear(16, 1), nn.Linear(16, 1)])
    x = torch.randn(64, 8)
    ya, yb = x[:, :1].sin(), x[:, 1:2] * x[:, 2:3]

    def losses():
        h = torch.relu(shared(x))
        return {"a": F.mse_loss(heads[0](h), ya), "b": 100 * F.mse_loss(heads[1](h), yb)}

    return shared, heads, losses


def train_toy_with_gradnorm(alpha, reg_lambda=0.0, steps=150, lr=0.05):
    """Adam on the network and on s_k (Chen et al. 2018 use one learning rate; 0.05 here)."""
    shared, heads, losses = toy_problem()
    gn = GradNorm(["a", "b"], alpha=alpha, reg_lambda=reg_lambda)
    net_opt = torch.optim.Adam([*shared.parameters(), *heads.parameters()], lr=1e-3)
    w_opt = torch.optim.Adam(gn.parameters(), lr=lr)
    history = []
    for _ in range(steps):
        net_opt.zero_grad()
        w_opt.zero_grad()
        stats = gn.backward(losses(), shared.weight)
        net_opt.step()
        w_opt.step()
        history.append(stats)
        w = gn.weights()
        assert torch.isfinite(w).all() and (w > 0).all()
    return gn, history


def norm_ratio(stats):
    return (stats["grad_norms"].max() / stats["grad_norms"].min()).item()


def test_gradnorm_brings_weighted_gradient_norms_together():
    # without the regulariser nothing holds the weights back: the weighted norms must meet their
    # targets (r_k G_ref), from the 100x apart that the loss scales give
    gn, history = train_toy_with_gradnorm(alpha=1.5, steps=200)
    assert norm_ratio(history[0]) > 20  # the 100x loss scale shows in the gradient norms
    last = history[-10:]
    assert sum(norm_ratio(s) for s in last) / 10 < 3
    assert all(torch.allclose(s["grad_norms"], s["targets"], rtol=0.5) for s in last)
    assert gn.weights()[0] > 10 * gn.weights()[1]  # by weighting the small task up


def test_gradnorm_regulariser_bounds_the_weights_on_a_starving_history():
    """A made-up loss history of the kind that starved retrieval before
    (docs/design.md#3-gradnorm-as-eq-5-6-write-it): task "hsic" barely falls and its gradient at
    the shared layer is 50x smaller than "info"'s, so GradNorm asks for ever more of its weight.
    With lambda the weights settle within |log w| <= alpha K / (2 lambda) -- and, alpha K /
    (2 lambda) = log 5 here, between 0.2 and 5 at every one of 3,000 steps; without lambda they
    run off."""
    def run(reg_lambda, steps=3000):
        gn = GradNorm(["hsic", "info", "triplet"], alpha=1.5, reg_lambda=reg_lambda)
        opt = torch.optim.Adam(gn.parameters(), lr=0.025)
        history = []
        for t in range(steps):
            losses = {"hsic": torch.tensor(0.9 + 0.1 * math.exp(-t / 500)),  # L/L0 stays near 0.9
                      "info": torch.tensor(4.0 * math.exp(-t / 300) + 0.4),  # falls to a tenth
                      "triplet": torch.tensor(0.3 * math.exp(-t / 600) + 0.05)}
            norms = torch.tensor([0.02, 1.0, 0.3])  # ||grad_W L_k||: HSIC's 50x smaller
            opt.zero_grad()
            l_grad, _ = gn.gradnorm_loss(losses, norms)
            (gn.alpha * l_grad + gn.regulariser()).backward()
            opt.step()
            history.append(gn.weights().detach().clone())
        return torch.stack(history)  # (steps, K)

    bound = 1.5 * 3 / (2 * math.log(5))  # lambda with alpha K / (2 lambda) = log 5
    weights = run(bound)
    assert GradNorm(["a", "b", "c"], alpha=1.5, reg_lambda=bound).bound() == pytest.approx(math.log(5))
    assert weights.min() >= 0.2 and weights.max() <= 5.0
    assert weights[-1, 1] < 0.5 and weights[-1, 0] > 1.0  # it still leans the way GradNorm asks
    free = run(0.0)
    assert free[-1, 0] > 20 * free[-1, 1]  # unbounded, HSIC takes the weight (the earlier failure)


def test_gradnorm_loss_reaches_only_the_task_weights():
    shared, heads, toy_losses = toy_problem(seed=1)

    def losses():  # three tasks, so that the last one's norm comes from a sum of two others
        l = toy_losses()
        return {**l, "c": 0.01 * shared.weight.pow(2).sum() + l["a"] * l["b"] / 100}

    s = torch.tensor([0.3, -0.3, 0.1])
    gn = GradNorm(["a", "b", "c"], reg_lambda=0.1)
    with torch.no_grad():
        gn.log_weights.copy_(s)
    shared.weight.grad = torch.ones_like(shared.weight)  # an accumulated gradient must not matter
    l = losses()
    norms = gn.task_grad_norms(l, shared.weight)
    explicit = [torch.autograd.grad(l[t], shared.weight, retain_graph=True)[0].norm() for t in "abc"]
    assert torch.allclose(norms, torch.stack(explicit))
    stats = gn.backward(l, shared.weight)
    w = s.exp()
    assert torch.allclose(stats["grad_norms"], w * norms, rtol=1e-4)  # the last one by subtraction
    got = {n: p.grad.clone() for n, p in shared.named_parameters()}
    got_s = gn.log_weights.grad.clone()
    # reference: network gradients of sum_k w_k L_k alone (Eq. 6, w constant)
    shared.zero_grad()
    shared.weight.grad = torch.ones_like(shared.weight)
    l = losses()
    (w[0] * l["a"] + w[1] * l["b"] + w[2] * l["c"]).backward()
    for n, p in shared.named_parameters():
        assert torch.allclose(got[n], p.grad, atol=1e-6), n
    # s_k gradient: alpha d L_grad / d s_k + 2 lambda s_k, L_grad = sum_k |G_k / G_ref - r_k| from
    # the explicit gradient norms, G_ref = mean_k G_k held constant
    g = w * norms
    g_ref = g.mean()  # first step: L(t) = L(0), so r_k = 1
    want = 1.5 * torch.sign(g / g_ref - 1) * g / g_ref + 2 * 0.1 * s
    assert torch.allclose(got_s, want, atol=1e-5)


def test_gradnorm_backward_runs_the_last_task_graph_once():
    """The K - 1 extra gradients must not pass through the last (most expensive) task's graph:
    a hook on that graph counts how often the backward runs it -- once, in the full backward.
    Taking the gradients of rows of torch.stack(losses) would run it K times."""
    shared, heads, toy_losses = toy_problem(seed=2)
    calls = []
    h = torch.relu(shared(torch.randn(16, 8)))
    expensive = h.clone()
    expensive.register_hook(lambda grad: calls.append(1))
    losses = {**toy_losses(), "fusion": expensive.pow(2).mean()}
    GradNorm(["a", "b", "fusion"]).backward(losses, shared.weight)
    assert len(calls) == 1


def test_gradnorm_names_missing_loss():
    gn = GradNorm(["info", "triplet"])
    with pytest.raises(KeyError, match="triplet"):
        gn.network_loss({"info": torch.tensor(1.0)})


def fake_outputs(b=6, e=8, q=3, seed=6):
    """Model outputs and a batch with the keys compute_losses reads (shapes of T2IReID.forward)."""
    g = torch.Generator().manual_seed(seed)
    unit = lambda n: F.normalize(torch.randn(n, e, generator=g), dim=-1)  # noqa: E731
    pids = torch.tensor([0, 0, 1, 1, 2, 2])
    out = dict(clo_image=unit(b), clo_text=unit(b), f_id=torch.randn(b, e, generator=g),
               f_clo=torch.randn(b, e, generator=g), image_emb=unit(b),
               identity_emb=unit(b), fusion_scores=torch.rand(b, q, generator=g) * 2 - 1,
               fusion_pids=torch.tensor([[p, (p + 1) % 3, (p + 2) % 3] for p in pids.tolist()]),
               fusion_query_pids=pids)
    clothing = torch.tensor([[101, 7, 102]] * 2 + [[101, 8, 102]] * 4)  # outfits: {0, 1}, {2..5}
    batch = dict(pids=pids, clothing=dict(input_ids=clothing, attention_mask=torch.ones_like(clothing)))
    return out, batch


def test_compute_losses_applies_each_equation_to_its_outputs():
    out, batch = fake_outputs()
    cfg = SimpleNamespace(temperature=0.1, hsic_kernel="linear", triplet_margin=0.3, triplet_squared=True, loss_aln=True,
                          loss_decouple=True, loss_info=True, loss_triplet=True, loss_fusion=True)
    got = compute_losses(out, batch, cfg)
    pids, outfit = batch["pids"], torch.tensor([0, 0, 1, 1, 1, 1])
    want = {
        "aln": clothing_alignment_loss(out["clo_image"], out["clo_text"], 0.1, outfit[:, None] == outfit),
        "decouple": hsic(F.normalize(out["f_id"], dim=-1), F.normalize(out["f_clo"], dim=-1)),
        "info": info_nce(out["identity_emb"] @ out["image_emb"].T, pids, pids, 0.1),  # identity text only
        "triplet": triplet_loss(F.normalize(out["f_id"], dim=-1), pids, 0.3),
        "fusion": F.cross_entropy(out["fusion_scores"] / 0.1, torch.zeros(6, dtype=torch.long)),
    }
    assert list(got) == list(want)
    for name in want:
        assert got[name].item() == pytest.approx(want[name].item(), rel=1e-5), name
    # inside a bf16 autocast region the losses are still computed in fp32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        amp = compute_losses(out, batch, cfg)
    for name in want:
        assert amp[name].dtype == torch.float32 and amp[name].item() == pytest.approx(got[name].item(), rel=1e-5)
    cfg.loss_aln = cfg.loss_fusion = False
    assert list(compute_losses(out, batch, cfg)) == ["decouple", "info", "triplet"]


def test_gradnorm_wants_the_fusion_loss_last():
    with pytest.raises(ValueError, match="fusion loss must be the last task"):
        GradNorm(["fusion", "info"])
    GradNorm(["info", "fusion"]), GradNorm(["info", "triplet"])  # fusion last, or no fusion


def three_task_losses(shared, toy_losses):
    """The toy's two tasks and a third whose gradient on W GradNorm gets by subtraction."""
    l = toy_losses()
    return {**l, "c": 0.01 * shared.weight.pow(2).sum() + l["a"] * l["b"] / 100}


@pytest.mark.parametrize("scale", [1024.0, torch.tensor(65536.0)])
def test_gradnorm_on_scaled_losses_matches_the_unscaled_computation(scale):
    """fp16's GradScaler (train.update): every backward runs on scale * loss. The norms G_k, the
    weights' gradient and the stats are those of the unscaled losses (to float rounding: a power
    of two scales exactly); the network's .grad is scale times the unscaled one, for the scaler's
    step to divide. The scale is applied by hand, as GradScaler does on a GPU; a CPU has no fp16
    autocast to need it."""
    results = []
    for s in (1.0, scale):
        shared, heads, toy_losses = toy_problem(seed=3)
        gn = GradNorm(["a", "b", "c"], alpha=1.5, reg_lambda=0.1)
        with torch.no_grad():
            gn.log_weights.copy_(torch.tensor([0.2, -0.1, 0.4]))
        stats = gn.backward(three_task_losses(shared, toy_losses), shared.weight, scale=s)
        grads = [p.grad / s for p in [*shared.parameters(), *heads.parameters()]]
        results.append((stats, gn.log_weights.grad.clone(), grads))
    (plain, plain_s, plain_grads), (scaled, scaled_s, scaled_grads) = results
    for key in ("grad_norms", "targets", "weights", "total", "gradnorm_loss"):
        torch.testing.assert_close(scaled[key], plain[key], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(scaled_s, plain_s, rtol=1e-5, atol=1e-7)
    for got, want in zip(scaled_grads, plain_grads):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-9)


def test_gradnorm_skips_the_weights_when_a_scaled_gradient_overflows():
    """An fp16 step whose scaled gradients overflow: GradScaler skips the network's step, and
    GradNorm leaves the weights without a gradient (Adam skips them) and their L(0) unset."""
    shared, heads, toy_losses = toy_problem(seed=3)
    gn = GradNorm(["a", "b", "c"], alpha=1.5, reg_lambda=0.1)
    stats = gn.backward(three_task_losses(shared, toy_losses), shared.weight, scale=float("inf"))
    assert not torch.isfinite(stats["grad_norms"]).all() and gn.log_weights.grad is None
    assert torch.isnan(gn.initial_losses).all()


@pytest.mark.parametrize("scale", [1.0, 1024.0])
def test_gradnorm_backward_by_subtraction_equals_the_plain_loop(scale):
    """GradNorm.backward (the last task's gradient on W by subtraction) against backward_plain
    (one autograd.grad per task) on the toy network with three tasks, weights away from 1 and a
    gradient already in W.grad: the same gradient on the s_k, on every network parameter, and
    the same stats, to 1e-5 relative (the subtraction rounds differently), scaled or not."""
    results = []
    for method in ("backward_plain", "backward"):
        shared, heads, toy_losses = toy_problem(seed=4)
        gn = GradNorm(["a", "b", "c"], alpha=1.5, reg_lambda=0.1)
        with torch.no_grad():
            gn.log_weights.copy_(torch.tensor([0.3, -0.2, 0.5]))
        shared.weight.grad = torch.ones_like(shared.weight)  # an accumulated gradient must not matter
        stats = getattr(gn, method)(three_task_losses(shared, toy_losses), shared.weight, scale=scale)
        grads = {n: p.grad.clone() for n, p in [*shared.named_parameters(), *heads.named_parameters()]}
        results.append((stats, gn.log_weights.grad.clone(), grads))
    (plain, plain_s, plain_grads), (fast, fast_s, fast_grads) = results
    torch.testing.assert_close(fast_s, plain_s, rtol=1e-5, atol=1e-8)
    assert fast_grads.keys() == plain_grads.keys()
    for name, grad in plain_grads.items():
        torch.testing.assert_close(fast_grads[name], grad, rtol=1e-5, atol=1e-8, msg=name)
    for key in ("grad_norms", "targets", "weights", "total", "gradnorm_loss"):
        torch.testing.assert_close(fast[key], plain[key], rtol=1e-5, atol=1e-8, msg=key)
