"""The paper's objective: Eq. 1-6, one function per equation, then the assembly.

Paper: "Disentangling Identity from Transient Attributes: A Semantically-Supervised Decoupling
Framework for Robust Person Re-Identification", Sec. III (the objective, Eq. 1-6).

    L_aln       Eq. 1  clothing alignment InfoNCE     clothing_alignment_loss
    L_decouple  Eq. 2  HSIC between f_id and f_clo    hsic
    L_info      Eq. 3  image-text InfoNCE             info_nce (+ multi_positive_nce)
    L_tri       Eq. 4  batch-hard triplet             triplet_loss
    GradNorm    Eq. 5  learned task weights           GradNorm.gradnorm_loss
    L_total     Eq. 6  sum_k w_k L_k + alpha L_grad   GradNorm.backward
                       + lambda sum_k (log w_k)^2

`compute_losses(out, batch, cfg)` at the bottom says which equation is applied to which output
of `model.T2IReID.forward`; train.py feeds its dict to `GradNorm.backward`.

Where this code departs from the letter of the paper, the docstring says so and why (see also
docs/design.md#design-decisions). References: Gretton et al. 2005 (HSIC), Hermans et al. 2017 (batch-hard
triplet), Chen et al. 2018 (GradNorm, arXiv:1711.02257), Khosla et al. 2020 (multi-positive
contrastive loss).

Tests: pytest tests/test_losses.py
"""
import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F


# -----------------------------------------------------------------------------
# configuration


@dataclass
class LossConfig:
    """The losses' fields: Eq. 1-4 and their balance by GradNorm (Eq. 5-6); paper defaults with their source."""

    temperature: float = 0.02  # tau of Eq. 1/3: not stated; IRRA's value
    triplet_margin: float = 0.3  # m of Eq. 4: not stated; Hermans et al. 2017
    triplet_squared: bool = True  # Eq. 4 as written: squared Euclidean distances
    hsic_kernel: str = "linear"  # Eq. 2 as written; "rbf" as an option
    gradnorm_alpha: float = 1.5  # paper (Eq. 6): the strength of the GradNorm loss
    weight_reg: float = 2.5  # lambda of Eq. 6, not stated: |log w_k| <= alpha K / (2 lambda) (GradNorm.bound)
    # Table IV (losses)
    loss_aln: bool = True  # Eq. 1
    loss_decouple: bool = True  # Eq. 2
    loss_info: bool = True  # Eq. 3, stage 1
    loss_triplet: bool = True  # Eq. 4
    loss_fusion: bool = True  # Eq. 3 on the fusion scores (docs/design.md#1-honest-retrieval-retrieve-then-re-rank)
    use_gradnorm: bool = True  # Eq. 5; False: all weights 1
    use_weight_reg: bool = True  # the lambda term of Eq. 6

    def __post_init__(self):
        if self.hsic_kernel not in ("linear", "rbf"):
            raise ValueError(f"LossConfig: hsic_kernel must be 'linear' or 'rbf', got {self.hsic_kernel!r}")
        if not self.loss_names():
            raise ValueError("LossConfig: every loss is switched off")

    def loss_names(self) -> list[str]:
        """The losses switched on, in the order of compute_losses, the fusion's last."""
        on = [self.loss_aln, self.loss_decouple, self.loss_info, self.loss_triplet, self.loss_fusion]
        return [name for name, flag in zip(("aln", "decouple", "info", "triplet", "fusion"), on) if flag]

    def balanced_names(self, fusion_detach: bool) -> list[str]:
        """GradNorm's tasks: the losses that reach the shared layer; a detached fusion loss
        (ModelConfig.fusion_detach) trains the fusion alone and joins the total with weight 1."""
        return [name for name in self.loss_names() if not (name == "fusion" and fusion_detach)]


# -----------------------------------------------------------------------------
# contrastive losses (Eq. 1 and Eq. 3) share one core: softmax cross-entropy whose target is
# spread uniformly over every positive of the anchor


def multi_positive_nce(logits: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """Row-wise InfoNCE with several positives per anchor.

        l_i = -1/|P(i)| * sum_{j in P(i)} log( exp(s_ij) / sum_k exp(s_ik) )

    i.e. the cross-entropy between softmax(s_i) and the uniform distribution over the positive
    set P(i) (Khosla et al. 2020, SupCon's "L_out"). With one positive per row it is the ordinary
    InfoNCE / cross-entropy. Rows without a positive are skipped.

    Args: logits (Q, G) already divided by the temperature; positives (Q, G) bool.
    Returns: scalar mean over the anchors that have a positive.
    """
    log_prob = F.log_softmax(logits, dim=1)  # (Q, G)
    pos = positives.to(log_prob.dtype)
    count = pos.sum(1)  # (Q,)
    has_pos = count > 0
    per_row = -(log_prob * pos).sum(1)[has_pos] / count[has_pos]  # (Q',)
    if per_row.numel() == 0:
        return logits.sum() * 0.0  # keeps the graph; no anchor had a positive
    return per_row.mean()


def clothing_alignment_loss(
    f_clo_v: torch.Tensor, f_clo_t: torch.Tensor, tau: float, positives: torch.Tensor | None = None
) -> torch.Tensor:
    """L_aln (Eq. 1): align visual clothing features with clothing-description features.

        L_aln = 1/2 [ -1/N sum_i log exp(s(v_i, t_i)/tau) / sum_j exp(s(v_i, t_j)/tau)
                      -1/N sum_i log exp(s(t_i, v_i)/tau) / sum_j exp(s(t_i, v_j)/tau) ]

    with s the cosine similarity, v_i = f^v_clo of image i and t_i = f^t_clo of its clothing
    description. Symmetric (image->text and text->image averaged): both encoders are trained,
    and the text->image direction is what makes a clothing description pick out its image; the
    paper writes the image->text term only. Samples wearing the same outfit (identical clothing
    descriptions, common in the cloth-changing regime) are positives of each other, not
    negatives: pass `positives`.

    Args: f_clo_v (N, E) visual clothing features; f_clo_t (N, E) clothing-text features;
        tau temperature; positives (N, N) bool, default the identity matrix.
    Returns: scalar.
    """
    sim = F.normalize(f_clo_v, dim=-1) @ F.normalize(f_clo_t, dim=-1).T  # (N, N) image x text
    if positives is None:
        positives = torch.eye(len(sim), dtype=torch.bool, device=sim.device)
    image_to_text = multi_positive_nce(sim / tau, positives)
    text_to_image = multi_positive_nce(sim.T / tau, positives.T)
    return (image_to_text + text_to_image) / 2


def info_nce(sim: torch.Tensor, pids_q: torch.Tensor, pids_g: torch.Tensor, tau: float) -> torch.Tensor:
    """L_info (Eq. 3) with identity-aware positives, in both directions.

        L_info = 1/2 [ 1/Q sum_i l(s_i., P_i) + 1/G sum_j l(s_.j, P_.j) ],
        P_ij = [pid(q_i) == pid(g_j)],  l = multi_positive_nce on s/tau

    The paper's Eq. 3 treats every other sample of the batch as a negative; with several images
    of one identity in a batch (the PK sampler) that pushes apart matching pairs. Here every
    same-identity pair is a positive (multi-positive average of log-softmax).

    Args: sim (Q, G) cosine similarities, queries (texts) x candidates (images);
        pids_q (Q,), pids_g (G,) identity labels; tau temperature.
    Returns: scalar.
    """
    positives = pids_q[:, None] == pids_g[None, :]  # (Q, G)
    text_to_image = multi_positive_nce(sim / tau, positives)
    image_to_text = multi_positive_nce(sim.T / tau, positives.T)
    return (text_to_image + image_to_text) / 2


# -----------------------------------------------------------------------------
# decoupling (Eq. 2)


def _rbf_gram(x: torch.Tensor) -> torch.Tensor:
    """K_ij = exp(-||x_i - x_j||^2 / (2 sigma^2)), sigma = median pairwise distance (detached)."""
    sq = torch.cdist(x, x).pow(2)  # (N, N)
    off_diagonal = sq[~torch.eye(len(x), dtype=torch.bool, device=x.device)]
    sigma2 = off_diagonal.detach().median().clamp_min(1e-12)  # median of d^2 = (median d)^2
    return torch.exp(-sq / (2 * sigma2))


def hsic(a: torch.Tensor, b: torch.Tensor, kernel: str = "linear") -> torch.Tensor:
    """L_decouple (Eq. 2): the biased HSIC estimator between two sets of features.

        HSIC(f_id, f_clo) = tr(K_id H K_clo H) / (N - 1)^2,   H = I_N - (1/N) 1 1^T

    K = a a^T for the linear kernel (as written in the paper; then HSIC equals the squared
    Frobenius norm of the cross-covariance matrix), or an RBF kernel with the median heuristic
    for the bandwidth (also catches non-linear dependence).

    Args: a (N, Da), b (N, Db) paired features (row i of each from sample i); kernel
        "linear" or "rbf".
    Returns: scalar >= 0 (zero when the two are independent, in expectation for large N).
    """
    if kernel not in ("linear", "rbf"):
        raise ValueError(f"hsic: kernel must be 'linear' or 'rbf', got {kernel!r}")
    n = len(a)
    if kernel == "linear":
        k, l = a @ a.T, b @ b.T  # (N, N)
    else:
        k, l = _rbf_gram(a), _rbf_gram(b)  # (N, N)
    h = torch.eye(n, device=a.device, dtype=a.dtype) - 1.0 / n  # (N, N) centring matrix
    return torch.trace(k @ h @ l @ h) / (n - 1) ** 2


# -----------------------------------------------------------------------------
# metric learning (Eq. 4)


def triplet_loss(feats: torch.Tensor, pids: torch.Tensor, margin: float, squared: bool = True) -> torch.Tensor:
    """L_tri (Eq. 4) with batch-hard mining (Hermans et al. 2017).

        L_tri = 1/N' sum_a [ max_{p: y_p = y_a, p != a} d(a, p) - min_{n: y_n != y_a} d(a, n) + m ]_+

    d is the squared Euclidean distance, as Eq. 4 writes ||f_a - f_p||_2^2 (squared=False: the
    distance itself, Hermans et al.'s choice); anchors with no other sample of their identity, or
    with no sample of another identity, are left out (N' anchors remain).

    Args: feats (N, D) visual identity features; pids (N,) labels; margin m; squared.
    Returns: scalar (0 with a graph when no anchor qualifies).
    """
    dist = (feats[:, None, :] - feats[None, :, :]).pow(2).sum(-1)  # (N, N) squared distances
    if not squared:
        dist = dist.clamp_min(1e-12).sqrt()  # no NaN gradient at 0
    same = pids[:, None] == pids[None, :]  # (N, N)
    not_self = ~torch.eye(len(feats), dtype=torch.bool, device=feats.device)
    pos_mask, neg_mask = same & not_self, ~same
    hardest_pos = dist.masked_fill(~pos_mask, float("-inf")).max(1).values  # (N,)
    hardest_neg = dist.masked_fill(~neg_mask, float("inf")).min(1).values  # (N,)
    valid = pos_mask.any(1) & neg_mask.any(1)
    if not valid.any():
        return feats.sum() * 0.0
    return F.relu(hardest_pos[valid] - hardest_neg[valid] + margin).mean()


# -----------------------------------------------------------------------------
# GradNorm (Eq. 5) and the total loss (Eq. 6)


class GradNorm(nn.Module):
    """Learned task weights w_k = exp(s_k), trained by GradNorm (Chen et al. 2018) as the
    paper's Eq. 5-6 write it.

    Eq. 5 (the GradNorm loss, a function of the s_k only):
        G_k    = || grad_W (w_k L_k) ||_2 = w_k || grad_W L_k ||_2     W: one shared parameter
        G_ref  = mean_j G_j                                           (detached)
        r_k    = L~_k / mean_j L~_j,   L~_k = L_k(t) / L_k(0)           relative inverse rate
        L_grad = sum_k | G_k / G_ref - r_k |                           r_k detached
    Eq. 6 (the objective):
        L_total = sum_k w_k L_k + alpha L_grad + lambda sum_k (log w_k)^2
    alpha = 1.5 is the *strength* of L_grad (Eq. 6), not Chen et al.'s exponent on r_k, which
    the paper's Eq. 5 does not write. The network trains on sum_k w_k L_k; the s_k train on
    alpha L_grad + lambda sum_k s_k^2. (The w_k of the first term are detached: its gradient on
    s_k, w_k L_k > 0, would only shrink every weight towards 0.)

    Two choices where the paper is silent (docs/design.md#3-gradnorm-as-eq-5-6-write-it):
    - G_ref is the mean weighted norm, and L_grad is measured in units of it. The gradient norms
      at W differ by orders of magnitude between a 4-layer ViT and ViT-B and over training; in
      these units alpha means the same on every preset.
    - The bound comes from lambda alone (nothing is clamped or renormalised). The gradient of
      alpha L_grad on s_k is alpha (G_k / G_ref) sign(.), at most alpha K in size (G_k <= K G_ref),
      and the regulariser's is 2 lambda s_k, so s_k can rest only where
          |log w_k| <= alpha K / (2 lambda)            (`bound()`; 0.2 <= w_k <= 5 for K = 5,
                                                        alpha 1.5, lambda 2.5: |log w| <= 1.5).
    In practice G_k / G_ref is well below K, and the weights stay closer to 1.

    backward_plain computes Eq. 5-6 as written; backward, which train.py calls, is the same with
    one backward pass fewer. Use (train.py):
        gradnorm = GradNorm(tasks, alpha, reg_lambda)  # the balanced losses, fusion last
        weight_optimizer = torch.optim.Adam(gradnorm.parameters(), lr=...)
        stats = gradnorm.backward(losses, model.shared_parameter())  # fills .grad of both
        optimizer.step(); weight_optimizer.step()
    """

    def __init__(self, tasks: Sequence[str], alpha: float = 1.5, reg_lambda: float = 0.0):
        super().__init__()
        self.tasks = tuple(tasks)
        if "fusion" in self.tasks[:-1]:
            raise ValueError(f"GradNorm: the fusion loss must be the last task, got {self.tasks}: backward() "
                             "gets the last task's gradient by subtraction, to spare a pass through the fusion")
        self.alpha, self.reg_lambda = alpha, reg_lambda
        self.log_weights = nn.Parameter(torch.zeros(len(self.tasks)))  # s_k, w_k = 1 at start
        self.register_buffer("initial_losses", torch.full((len(self.tasks),), float("nan")))  # L_k(0)

    def weights(self) -> torch.Tensor:
        """w_k = exp(s_k), shape (K,)."""
        return self.log_weights.exp()

    def bound(self) -> float:
        """alpha K / (2 lambda): the largest |log w_k| at which s_k can rest (inf without lambda)."""
        return self.alpha * len(self.tasks) / (2 * self.reg_lambda) if self.reg_lambda > 0 else math.inf

    def _tasks(self, losses: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """The K losses in task order. Take gradients of these tensors, never of rows of their
        torch.stack: the backward of a stack sends (zero) gradients into every stacked loss, so
        each autograd.grad would run the whole graph, the fusion included."""
        missing = [t for t in self.tasks if t not in losses]
        if missing:
            raise KeyError(f"GradNorm: losses {missing} missing; got {sorted(losses)}, expected {self.tasks}")
        return [losses[t] for t in self.tasks]

    def _stack(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.stack(self._tasks(losses))  # (K,)

    def regulariser(self) -> torch.Tensor:
        """lambda sum_k (log w_k)^2, the last term of Eq. 6."""
        return self.reg_lambda * self.log_weights.pow(2).sum()

    def network_loss(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        """sum_k w_k L_k with the w_k detached: what the network trains on (Eq. 6, first term)."""
        return (self.weights().detach() * self._stack(losses)).sum()

    def gradnorm_loss(self, losses: dict[str, torch.Tensor], grad_norms: torch.Tensor):
        """Eq. 5 from the norms ||grad_W L_k|| (K,). Returns (L_grad, stats); L_grad depends on
        the s_k only (G_k = w_k ||grad_W L_k|| is linear in w_k for a fixed network)."""
        current = self._stack(losses).detach()  # (K,)
        if torch.isnan(self.initial_losses).any():
            self.initial_losses.copy_(current.clamp_min(1e-12))
        g = self.weights() * grad_norms.detach().to(current.dtype)  # (K,) G_k
        g_ref = g.mean().detach().clamp_min(1e-12)
        ratio = current / self.initial_losses  # L~_k
        target = ratio / ratio.mean()  # r_k
        stats = {"grad_norms": g.detach(), "targets": target * g_ref, "weights": self.weights().detach()}
        return (g / g_ref - target).abs().sum(), stats

    def task_gradients(self, losses: list[torch.Tensor], shared: torch.Tensor, scale=1.0, reduce=None) -> list:
        """grad_W L_k for each of `losses`, one `torch.autograd.grad(retain_graph=True)` each;
        zeros where L_k does not reach W. Each runs on scale * L_k and is divided by scale (see
        backward_plain); `reduce` averages them over the processes."""
        grads = []
        for loss in losses:
            (grad,) = torch.autograd.grad(loss * scale, shared, retain_graph=True, allow_unused=True)
            grads.append(torch.zeros_like(shared) if grad is None else grad / scale)
        if reduce is not None and grads:
            grads = list(reduce(torch.stack(grads)))  # (K', *W.shape), averaged over processes
        return grads

    def task_grad_norms(self, losses: dict[str, torch.Tensor], shared: torch.Tensor) -> torch.Tensor:
        """||grad_W L_k|| for each task: (K,)."""
        return torch.stack([grad.norm() for grad in self.task_gradients(self._tasks(losses), shared)])

    def weighted_total(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        """sum_k w_k L_k, plus the losses outside the tasks (a detached fusion loss) with weight 1."""
        return self.network_loss(losses) + sum(v for k, v in losses.items() if k not in self.tasks)

    def weight_step(self, losses: dict[str, torch.Tensor], norms: torch.Tensor, weighted: torch.Tensor) -> dict:
        """Fill the s_k's .grad from alpha L_grad + lambda sum_k s_k^2, given ||grad_W L_k|| (K,)
        and the network's weighted loss. Returns the stats: G_k, their targets r_k G_ref, w_k,
        L_total, L_grad. A non-finite norm (an fp16 overflow) leaves the weights without a gradient."""
        if not torch.isfinite(norms).all():  # the scaler skips this step: so does Adam on s_k
            return {"total": weighted.detach(), "grad_norms": norms.detach()}
        l_grad, stats = self.gradnorm_loss(losses, norms)
        weight_loss = self.alpha * l_grad + self.regulariser()
        (grad_s,) = torch.autograd.grad(weight_loss, self.log_weights)  # only s_k sees these
        self.log_weights.grad = grad_s if self.log_weights.grad is None else self.log_weights.grad + grad_s
        total = weighted.detach() + weight_loss.detach()  # L_total of Eq. 6
        stats.update(total=total, gradnorm_loss=l_grad.detach())
        return stats

    def backward_plain(self, losses: dict[str, torch.Tensor], shared: torch.Tensor, reduce=None, scale=1.0) -> dict:
        """Eq. 5-6 as written: grad_W L_k for each task (K backward passes to W), the network's
        .grad from sum_k w_k L_k, then the s_k's from alpha L_grad + lambda sum_k s_k^2. Returns
        weight_step's stats.

        Under fp16 autocast, `scale` is the GradScaler's factor (train.update; 1 otherwise): every
        backward runs on scale * loss, so that small fp16 gradients do not flush to zero. The
        network's .grad is left scaled, for the scaler's step to unscale; the gradients on W are
        unscaled, so that G_k, L_grad and the weights are those of the unscaled losses.

        Under DistributedDataParallel, `reduce` averages a tensor over the processes (train.py
        passes an all-reduce): DDP averages what backward() accumulates in .grad, not what
        autograd.grad returns. With losses that are the same on every process (train.py computes
        them over the global batch), every process then gets the same norms and weights.
        """
        grads = self.task_gradients(self._tasks(losses), shared, scale, reduce)  # K x grad_W L_k
        weighted = self.weighted_total(losses)
        (weighted * scale).backward()  # the network
        return self.weight_step(losses, torch.stack([grad.norm() for grad in grads]), weighted)

    def backward(self, losses: dict[str, torch.Tensor], shared: torch.Tensor, reduce=None, scale=1.0) -> dict:
        """backward_plain's gradients and stats with one backward pass fewer: the full backward
        adds sum_k w_k grad_W L_k to W.grad, so grad_W L_last = (added - sum_{k<last} w_k
        grad_W L_k) / w_last. Exact for any order (w_last > 0); the saving is the last task's
        pass, so train.py puts the fusion loss, the most expensive, last (__init__ checks)."""
        # Optimisation: the last task's gradient on W by subtraction, sparing a pass through the fusion.
        w = self.weights().detach()  # (K,)
        before = torch.zeros_like(shared) if shared.grad is None else shared.grad.detach().clone()
        grads = self.task_gradients(self._tasks(losses)[:-1], shared, scale, reduce)  # K - 1 x grad_W L_k
        others = torch.zeros_like(shared)
        for k, grad in enumerate(grads):
            others += w[k] * grad
        weighted = self.weighted_total(losses)  # a loss outside the tasks must not reach W: it would be subtracted
        (weighted * scale).backward()  # the network
        added = torch.zeros_like(shared) if shared.grad is None else (shared.grad.detach() - before) / scale
        last = (added - others) / w[-1]  # grad_W L_last, unscaled
        return self.weight_step(losses, torch.stack([grad.norm() for grad in grads] + [last.norm()]), weighted)


# -----------------------------------------------------------------------------
# the objective: which equation is applied to which model output


def same_rows(token_ids: torch.Tensor) -> torch.Tensor:
    """(N, T) token ids -> (N, N) bool, True where two texts are identical."""
    return (token_ids[:, None, :] == token_ids[None, :, :]).all(-1)


def compute_losses(out: dict, batch: dict, cfg) -> dict[str, torch.Tensor]:
    """The named losses switched on in `cfg` (a LossConfig), from `T2IReID.forward`.

    aln      Eq. 1 on the visual clothing feature vs the clothing description (identical
             descriptions are positives of each other)
    decouple Eq. 2 on L2-normalised f_id and f_clo (normalised so that the loss cannot be won
             by shrinking the features)
    info     Eq. 3 on stage-1 similarities, identity descriptions vs images (only the textual
             identity meets the visual identity: docs/design.md#5-text-side-only-identity-text-meets-the-identity-path)
    triplet  Eq. 4 on L2-normalised f_id
    fusion   Eq. 3 on fusion scores: each text against its Q nearest images by stage 1, its
             own among them; positives = the candidates of the text's identity

    The losses come in the order of cfg.loss_names(), fusion last: GradNorm.backward takes the
    last task's gradient by subtraction, which spares a backward pass through the costliest loss
    (tests/test_model.py checks the order for every ablation row).
    """
    pids, tau = batch["pids"], cfg.temperature
    # fp32 even inside a bf16 autocast region: the logits s / tau need the mantissa bits
    out = {k: v.float() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in out.items()}
    losses = {}
    with torch.autocast(pids.device.type, enabled=False):
        if cfg.loss_aln:
            positives = same_rows(batch["clothing"]["input_ids"])  # (B, B)
            losses["aln"] = clothing_alignment_loss(out["clo_image"], out["clo_text"], tau, positives)
        if cfg.loss_decouple:
            f_id, f_clo = F.normalize(out["f_id"], dim=-1), F.normalize(out["f_clo"], dim=-1)
            losses["decouple"] = hsic(f_id, f_clo, cfg.hsic_kernel)
        if cfg.loss_info:
            losses["info"] = info_nce(out["identity_emb"] @ out["image_emb"].T, pids, pids, tau)
        if cfg.loss_triplet:
            losses["triplet"] = triplet_loss(F.normalize(out["f_id"], dim=-1), pids, cfg.triplet_margin,
                                             cfg.triplet_squared)
        if cfg.loss_fusion:
            positives = out["fusion_pids"] == out["fusion_query_pids"][:, None]  # (S, Q)
            losses["fusion"] = multi_positive_nce(out["fusion_scores"] / tau, positives)
    return losses
