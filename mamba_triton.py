"""The selective scan of Mamba, written from scratch in Triton (forward and backward), and the Mamba block.

Read this file top to bottom, as a ladder: (1) the equations, here; (2) a sequential PyTorch
reference written from them; (3) the forward kernel; (4) the backward kernel; (5) the autograd
function that joins them; (6) the Mamba block that uses the scan.

The selective scan (Gu & Dao, "Mamba: Linear-Time Sequence Modeling with Selective State Spaces",
2023, Sec. 3.2, Algorithm 2; semantics of `selective_scan_fn` in github.com/state-spaces/mamba,
mamba_ssm/ops/selective_scan_interface.py). For every batch element b and channel d, with a state
h of N numbers per channel, kept in fp32 whatever the input dtype:

    delta_t = softplus(delta_t + delta_bias)                  (both optional)
    h_t     = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t  (zero-order hold of A; Euler step of B)
    y_t     = <h_t, C_t> + D * u_t                            (D optional)
    out_t   = y_t * silu(z_t)                                 (z optional)

with h_{-1} = 0. A is per channel (d, n); B and C depend on the input (per batch and step).

Glossary of dimension letters (the Mamba paper's symbols in brackets):
    b  batch size                                   (B)
    l  sequence length, time steps                  (L)
    d  channels of the scan = d_inner of the block  (D)
    n  state size per channel = d_state             (N)
    m  model width of the block, d_model
    r  rank of the delta projection, dt_rank = ceil(d_model / 16)
Tensor names follow the official implementation: u, delta, z are (b, d, l); A is (d, n);
B, C are (b, n, l); D and delta_bias are (d,).

Run:  python mamba_triton.py          errors of the output and every gradient against the reference
      python mamba_triton.py --bench  timings on a GPU
Test: pytest tests/test_mamba_triton.py   (CPU, kernels in the Triton interpreter)
"""
import math
import os

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

# ------------------------------------------------------------------------------------------------
# 1. Input checks shared by every implementation


def _check_inputs(u, delta, A, B, C, D, z, delta_bias):
    """Raise a ValueError naming the argument whose shape disagrees with u (b, d, l) and A (d, n)."""
    if u.dim() != 3 or A.dim() != 2:
        raise ValueError(f"selective_scan: u must be (batch, channels, L) and A (channels, N); "
                         f"got u {tuple(u.shape)}, A {tuple(A.shape)}")
    b, d, l = u.shape
    n = A.shape[1]
    expected = {"delta": (b, d, l), "A": (d, n), "B": (b, n, l), "C": (b, n, l),
                "D": (d,), "z": (b, d, l), "delta_bias": (d,)}
    given = {"delta": delta, "A": A, "B": B, "C": C, "D": D, "z": z, "delta_bias": delta_bias}
    for name, tensor in given.items():
        if tensor is not None and tuple(tensor.shape) != expected[name]:
            raise ValueError(f"selective_scan: {name} has shape {tuple(tensor.shape)}, expected "
                             f"{expected[name]} for u of shape (batch, channels, L) = {(b, d, l)} "
                             f"and N = {n}")
    if l == 0:
        raise ValueError("selective_scan: the sequence is empty (L = 0)")


# ------------------------------------------------------------------------------------------------
# 2. The reference: the equations above, one time step at a time, in fp32


def selective_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       return_last_state=False):
    """Sequential PyTorch selective scan (the equations of the module docstring).

    Args: u, delta, z (b, d, l); A (d, n); B, C (b, n, l); D, delta_bias (d,).
    Returns: out (b, d, l) in u's dtype, and, if return_last_state, the final state h (b, d, n) fp32.
    Mirrors `selective_scan_ref` of mamba_ssm (real A, input-dependent B and C only).
    """
    _check_inputs(u, delta, A, B, C, D, z, delta_bias)
    dtype_in = u.dtype
    u, delta, A, B, C = (t.float() for t in (u, delta, A, B, C))
    if delta_bias is not None:
        delta = delta + delta_bias.float()[:, None]                  # (b, d, l)
    if delta_softplus:
        delta = F.softplus(delta)                                    # (b, d, l), threshold 20
    h = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])              # (b, d, n) state h_{-1} = 0
    ys = []
    for t in range(u.shape[2]):
        decay = torch.exp(delta[:, :, t, None] * A)                  # (b, d, n)  exp(delta_t A)
        drive = delta[:, :, t, None] * B[:, None, :, t] * u[:, :, t, None]  # (b, d, n)  delta B u
        h = decay * h + drive                                        # (b, d, n)
        ys.append(torch.einsum("bdn,bn->bd", h, C[:, :, t]))        # (b, d)  <h_t, C_t>
    y = torch.stack(ys, dim=2)                                       # (b, d, l)
    if D is not None:
        y = y + D.float()[:, None] * u
    if z is not None:
        y = y * F.silu(z.float())
    out = y.to(dtype_in)
    return (out, h) if return_last_state else out


# ------------------------------------------------------------------------------------------------
# 5. Dispatch: the Triton kernels on CUDA (or on CPU in the interpreter), the reference otherwise

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # read once: kernels are decorated at import


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   return_last_state=False):
    """The selective scan; same arguments and results as `selective_scan_ref`."""
    return selective_scan_ref(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)


# ------------------------------------------------------------------------------------------------
# 6. The Mamba block (Gu & Dao 2023, Fig. 3; mamba_ssm/modules/mamba_simple.py)


class Mamba(nn.Module):
    """in_proj -> (x, z); x -> causal depthwise conv -> SiLU -> selective scan gated by SiLU(z) -> out_proj.

    437,760 parameters at d_model 256, d_state 16, d_conv 4, expand 2. Dropout and the residual
    connection belong to the caller (model.py).
    """

    def __init__(self, d_model, d_state=16, d_conv=4, expand=2, dt_min=1e-3, dt_max=1e-1):
        super().__init__()
        self.d_inner = expand * d_model                              # d
        self.d_state = d_state                                       # n
        self.dt_rank = math.ceil(d_model / 16)                       # r
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=False)
        self.conv1d = nn.Conv1d(self.d_inner, self.d_inner, d_conv, groups=self.d_inner,
                                padding=d_conv - 1)                  # depthwise; causal by cropping
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True)  # its bias is delta_bias
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False)
        # dt_proj: weights uniform in +-r^-0.5; bias = softplus^-1(dt), dt log-uniform in
        # [dt_min, dt_max], so that softplus(bias) starts at a useful step size (Mamba Sec. 3.6).
        std = self.dt_rank ** -0.5
        nn.init.uniform_(self.dt_proj.weight, -std, std)
        dt = torch.exp(torch.rand(self.d_inner) * (math.log(dt_max) - math.log(dt_min))
                       + math.log(dt_min)).clamp(min=1e-4)           # (d,)
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse of softplus
        # S4D-Real initialisation: A = -(1, 2, ..., N) for every channel, stored as its log.
        A = torch.arange(1, d_state + 1, dtype=torch.float32).repeat(self.d_inner, 1)  # (d, n)
        self.A_log = nn.Parameter(torch.log(A))
        self.D = nn.Parameter(torch.ones(self.d_inner))              # (d,) skip connection

    def forward(self, x):
        """x (b, l, m) -> (b, l, m). Output at step t depends only on inputs at steps <= t."""
        length = x.shape[1]
        xs, z = self.in_proj(x).chunk(2, dim=-1)                     # (b, l, d) each
        xs = rearrange(xs, "b l d -> b d l")
        xs = F.silu(self.conv1d(xs)[..., :length])                   # (b, d, l) causal conv
        x_dbl = self.x_proj(rearrange(xs, "b d l -> b l d"))         # (b, l, r + 2n)
        dt, B, C = x_dbl.split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = F.linear(dt, self.dt_proj.weight)                    # (b, l, d); bias added in scan
        A = -torch.exp(self.A_log.float())                           # (d, n)
        y = selective_scan(xs, rearrange(delta, "b l d -> b d l"), A,
                           rearrange(B, "b l n -> b n l"), rearrange(C, "b l n -> b n l"),
                           D=self.D.float(), z=rearrange(z, "b l d -> b d l"),
                           delta_bias=self.dt_proj.bias.float(), delta_softplus=True)  # (b, d, l)
        return self.out_proj(rearrange(y, "b d l -> b l d"))         # (b, l, m)
