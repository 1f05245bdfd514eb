"""Mamba's selective scan in Triton, forward and backward, written from scratch, and the block.

Read this file top to bottom, as a ladder: the equations, here; (2) a sequential PyTorch
reference written from them; (3) the forward kernel; (4) the backward kernel, which recomputes
states from checkpoints; (5) the autograd function that joins them; (6) the dispatch: Triton on
CUDA tensors (or on CPU under TRITON_INTERPRET=1, as the tests run), else the CPU scan of
helpers/scan_cpu.py (the reference's recurrence with its backward written out); (7) the Mamba
block; (8) the check against the reference. The next rung, tools/mamba_chunked.py, runs the same
scan in two passes over segments of the sequence, for batches too small to fill a GPU (the block
here stays on the sequential kernels). tools/mamba_bench.py times the scans on a GPU;
tools/mamba_compile.py compiles the kernels for sm_75 to sm_90 without one.

The selective scan (Gu & Dao, "Mamba: Linear-Time Sequence Modeling with Selective State Spaces",
2023, Sec. 3.2, Algorithm 2; semantics of `selective_scan_fn` in github.com/state-spaces/mamba,
mamba_ssm/ops/selective_scan_interface.py). For every batch element b and channel d, with a state
h of N numbers per channel, kept in fp32 whatever the input dtype:

    delta_t = softplus(delta_t + delta_bias)                  (both optional)
    h_t     = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t  (zero-order hold of A, Euler for B)
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

Differences from mamba_ssm's CUDA kernel, each for clarity: real A only, and B, C always
input-dependent; a sequential loop over time in each program instead of a parallel scan; sums
over channels and batch written as partials and added by PyTorch (deterministic, no atomics);
gradients also flow through the returned last state. References: the official code above;
Sasha Rush's "Mamba: The Hard Way" (srush.github.io/annotated-mamba/hard.html) for the ladder.

Run:  python mamba_triton.py     errors of the output and every gradient against the reference
      python -m tools.mamba_bench      timings on a GPU
      python -m tools.mamba_compile    cubin for sm_75, sm_80, sm_86, sm_90 on the CPU: registers, spills
Test: pytest tests/test_mamba_triton.py   (CPU, kernels in the Triton interpreter)
      pytest tests/test_compile.py        (CPU, kernels compiled for GPU targets by ptxas)
"""
import math
import os
import sys

import torch
import torch.nn.functional as F
from einops import rearrange
if __name__ == "__main__" and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")   # CPU check: must precede triton's import
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from torch import nn

from helpers.scan_cpu import check_inputs, kernel_refusal, selective_scan_cpu

# ------------------------------------------------------------------------------------------------
# 2. The reference: the equations above, one time step at a time, in fp32

def selective_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       return_last_state=False):
    """Sequential PyTorch selective scan (the equations of the module docstring).

    Args: u, delta, z (b, d, l); A (d, n); B, C (b, n, l); D, delta_bias (d,).
    Returns: out (b, d, l) in u's dtype and, if return_last_state, the last state (b, d, n) fp32.
    Mirrors `selective_scan_ref` of mamba_ssm (real A, input-dependent B and C only).
    """
    check_inputs(u, delta, A, B, C, D, z, delta_bias)
    dtype_in = u.dtype
    u, delta, A, B, C = (t.float() for t in (u, delta, A, B, C))
    if delta_bias is not None:
        delta = delta + delta_bias.float()[:, None]                  # (b, d, l)
    if delta_softplus:
        delta = F.softplus(delta)                                    # (b, d, l), threshold 20
    # All steps' factors at once, split with unbind: autograd of [:, :, t] per step is O(L^2) work
    decay = torch.exp(torch.einsum("bdl,dn->lbdn", delta, A))        # (l, b, d, n)  exp(delta_t A)
    drive = torch.einsum("bdl,bnl,bdl->lbdn", delta, B, u)           # (l, b, d, n)  delta_t B_t u_t
    h = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])              # (b, d, n) state h_{-1} = 0
    ys = []
    for decay_t, drive_t, c_t in zip(decay.unbind(0), drive.unbind(0), C.unbind(2)):
        h = decay_t * h + drive_t                                    # (b, d, n)
        ys.append(torch.einsum("bdn,bn->bd", h, c_t))               # (b, d)  <h_t, C_t>
    y = torch.stack(ys, dim=2)                                       # (b, d, l)
    if D is not None:
        y = y + D.float()[:, None] * u
    if z is not None:
        y = y * F.silu(z.float())
    out = y.to(dtype_in)
    return (out, h) if return_last_state else out


# ------------------------------------------------------------------------------------------------
# 3. The forward kernel
#
# One program owns one batch element and a block of BLOCK_D channels, and keeps their states in
# registers, in fp32, while it walks the sequence one step at a time: the scan is sequential in
# time and parallel over batch and channels. The state is held transposed, h (BLOCK_N, BLOCK_D),
# so that the BLOCK_D = 32 channels run across the 32 threads of the program's single warp: each
# thread holds the whole state of one channel, and <h_t, C_t> is a sum inside one thread.
# Every CHUNK steps the program writes h to a small checkpoint buffer (b, l / CHUNK, n, d), from
# which the backward recomputes the states; the full (b, d, l, n) history is never stored.
# u, delta, z and out are read through strides, so time-major views (b, d, l) of (b, l, d) memory,
# as the Mamba block passes them, are read in place with one 128-byte load per step.
# A sequential loop (not tl.associative_scan) keeps the kernel short and fast in the interpreter.

BLOCK_D = 32      # channels per program = threads of one warp (64 x 512 channels: 1,024 programs)
NUM_WARPS = 1     # one config everywhere: the interpreter cannot autotune
CHUNK = 32        # steps between checkpoints: in fp32 they cost N / CHUNK = half of u's size
NUM_STAGES = tl.constexpr(3)  # tl.range loads step t + 2 while step t computes (1: no pipelining)


@triton.jit
def _softplus(x):
    """log(1 + exp(x)) in fp32 without libdevice: Kahan's log1p trick, and x itself above 20."""
    e = tl.exp(tl.minimum(x, 20.0))
    w = 1.0 + e                                      # rounds to 1 when e < 6e-8 ...
    log1p = tl.where(w == 1.0, e, tl.log(w) * (e / tl.where(w == 1.0, 1.0, w - 1.0)))  # so fix it
    return tl.where(x > 20.0, x, log1p)             # torch.nn.functional.softplus's threshold


@triton.jit
def _load_step(u_ptr, delta_ptr, B_ptr, C_ptr, bias, row, col, t, s_l, sB_l, mask_d, mask_n,
               HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    """Load step t of u, delta (biased, before softplus), delta (after), B and C, in fp32."""
    u = tl.load(u_ptr + row + t * s_l, mask=mask_d, other=0.0).to(tl.float32)          # (BLOCK_D,)
    dt_raw = tl.load(delta_ptr + row + t * s_l, mask=mask_d, other=0.0).to(tl.float32)
    if HAS_BIAS:
        dt_raw += bias
    dt = dt_raw
    if SOFTPLUS:
        dt = _softplus(dt_raw)
    B = tl.load(B_ptr + col + t * sB_l, mask=mask_n, other=0.0).to(tl.float32)         # (BLOCK_N,)
    C = tl.load(C_ptr + col + t * sB_l, mask=mask_n, other=0.0).to(tl.float32)         # (BLOCK_N,)
    return u, dt_raw, dt, B, C


@triton.jit
def _scan_fwd_kernel(
    u_ptr,          # (b, d, l) input sequence, any float dtype
    delta_ptr,      # (b, d, l) step sizes, before delta_bias and softplus; u's strides
    z_ptr,          # (b, d, l) gate, u's strides; read only if HAS_Z
    out_ptr,        # (b, d, l) output in u's dtype and strides
    A_ptr,          # (n, d) A transposed and contiguous (channels adjacent)
    B_ptr,          # (b, n, l) input matrix, one per batch element and step
    C_ptr,          # (b, n, l) output matrix, B's strides
    D_ptr,          # (d,) skip weights; read only if HAS_D
    bias_ptr,       # (d,) delta_bias; read only if HAS_BIAS
    ckpt_ptr,       # (b, n_chunks, n, d) fp32: the state after the last step of every chunk
    n_channels, seq_len, d_state, n_chunks,   # d, l, n, ceil(l / CHUNK)
    s_b, s_d, s_l,      # strides of u, delta, z, out (in elements)
    sB_b, sB_n, sB_l,   # strides of B and C
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    BLOCK_D: tl.constexpr,   # channels per program
    BLOCK_N: tl.constexpr,   # d_state rounded up to a power of two (tl.arange needs one)
    CHUNK: tl.constexpr,     # steps between checkpoints
):
    pid_b = tl.program_id(0).to(tl.int64)                            # this program's batch element
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)      # (BLOCK_D,) and its channels
    offs_n = tl.arange(0, BLOCK_N)                                   # (BLOCK_N,)
    mask_d, mask_n = offs_d < n_channels, offs_n < d_state
    mask_nd = mask_n[:, None] & mask_d[None, :]                      # (BLOCK_N, BLOCK_D)
    nd = offs_n[:, None] * n_channels + offs_d[None, :]              # (BLOCK_N, BLOCK_D) in (n, d)
    A = tl.load(A_ptr + nd, mask=mask_nd, other=0.0).to(tl.float32)
    D = tl.load(D_ptr + offs_d, mask=mask_d & HAS_D, other=0.0).to(tl.float32)        # (BLOCK_D,)
    bias = tl.load(bias_ptr + offs_d, mask=mask_d & HAS_BIAS, other=0.0).to(tl.float32)
    row = pid_b * s_b + offs_d * s_d                  # (BLOCK_D,) start of each channel's sequence
    col = pid_b * sB_b + offs_n * sB_n                # (BLOCK_N,) start of each row of B and C
    ckpt = ckpt_ptr + pid_b * n_chunks * d_state * n_channels + nd
    h = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)               # h_{-1} = 0
    for c in range(n_chunks):
        t1 = tl.minimum(c * CHUNK + CHUNK, seq_len)
        for t in tl.range(c * CHUNK, t1, num_stages=NUM_STAGES):
            u, dt_raw, dt, B, C = _load_step(u_ptr, delta_ptr, B_ptr, C_ptr, bias, row, col, t,
                                             s_l, sB_l, mask_d, mask_n, HAS_BIAS, SOFTPLUS)
            h = tl.exp(dt[None, :] * A) * h + B[:, None] * (dt * u)[None, :]  # h_t
            y = tl.sum(h * C[:, None], axis=0)                         # (BLOCK_D,) <h_t, C_t>
            if HAS_D:
                y += D * u
            if HAS_Z:
                z = tl.load(z_ptr + row + t * s_l, mask=mask_d, other=0.0).to(tl.float32)
                y = y * z / (1.0 + tl.exp(-z))                         # y * silu(z)
            tl.store(out_ptr + row + t * s_l, y.to(out_ptr.dtype.element_ty), mask=mask_d)
        tl.store(ckpt + c * d_state * n_channels, h, mask=mask_nd)


# ------------------------------------------------------------------------------------------------
# 4. The backward kernel
#
# Reverse-mode through the recurrence. With g_t = dL/dout_t and dh_t = dL/dh_t:
#     dy_t  = g_t * silu(z_t)                 dz_t = g_t * y_t * silu'(z_t)
#     dh_t  = dy_t * C_t + exp(delta_{t+1} A) * dh_{t+1}          (+ dL/dh_last at the last step)
#     dC_t  = sum_d dy_t h_t                  dB_t = sum_d dh_t delta_t u_t
#     du_t  = dy_t D + delta_t <dh_t, B_t>    dD   = sum_{b,t} dy_t u_t
#     ddelta_t = u_t <dh_t, B_t> + <dh_t * h_{t-1} * exp(delta_t A), A>
#     dA    = sum_{b,t} dh_t * h_{t-1} * exp(delta_t A) * delta_t
#     through softplus: multiply ddelta_t by sigmoid(delta_t + delta_bias); d delta_bias = sum_{b,t}
# The walk needs h_{t-1} in reverse order. For each chunk, from last to first, the program
# recomputes the chunk's states forward from the previous checkpoint into a private scratch buffer
# of CHUNK states, then walks the chunk backwards reading them. Sums over channels (dB, dC) are
# written per channel block and sums over batch (dA, dD, d delta_bias) per batch element; the
# wrapper adds up these partials, which keeps the result deterministic (no atomics).

@triton.jit
def _recompute_chunk(u_ptr, delta_ptr, B_ptr, C_ptr, bias, A, h, scratch, row, col, t0, t1, s_l,
                     sB_l, mask_d, mask_n, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
                     BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    """Run the recurrence from h over steps t0..t1-1, storing each step's h_{t-1} to scratch."""
    for t in tl.range(t0, t1, num_stages=NUM_STAGES):
        tl.store(scratch + (t - t0) * BLOCK_N * BLOCK_D, h)          # h_{t-1}, (BLOCK_N, BLOCK_D)
        u, dt_raw, dt, B, C = _load_step(u_ptr, delta_ptr, B_ptr, C_ptr, bias, row, col, t, s_l,
                                         sB_l, mask_d, mask_n, HAS_BIAS, SOFTPLUS)
        h = tl.exp(dt[None, :] * A) * h + B[:, None] * (dt * u)[None, :]


@triton.jit
def _scan_bwd_kernel(
    u_ptr, delta_ptr, z_ptr, A_ptr, B_ptr, C_ptr, D_ptr, bias_ptr,   # the forward's inputs
    ckpt_ptr,       # (b, n_chunks, n, d) fp32 checkpoints written by the forward
    dout_ptr,       # (b, d, l) dL/dout, u's strides
    dlast_ptr,      # (b, n, d) fp32 dL/dh at the last step (zeros unless the last state is used)
    scratch_ptr,    # (b, d_blocks, CHUNK, BLOCK_N, BLOCK_D) fp32, one private slab per program
    du_ptr, ddelta_ptr, dz_ptr,     # (b, d, l) gradients in u's strides, each in its input's dtype
    dA_ptr,         # (b, n, d) fp32 partial dA of each batch element
    dB_ptr, dC_ptr,  # (b, d_blocks, l, n) fp32 partial dB, dC of each channel block
    dD_ptr, dbias_ptr,  # (b, d) fp32 partial dD, d delta_bias of each batch element
    n_channels, seq_len, d_state, n_chunks, s_b, s_d, s_l, sB_b, sB_n, sB_l,   # as in the forward
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr,
):
    pid_b, pid_d, d_blocks = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.num_programs(1)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)                 # (BLOCK_D,)
    offs_n = tl.arange(0, BLOCK_N)                                   # (BLOCK_N,)
    mask_d, mask_n = offs_d < n_channels, offs_n < d_state
    mask_nd = mask_n[:, None] & mask_d[None, :]
    nd = offs_n[:, None] * n_channels + offs_d[None, :]              # (BLOCK_N, BLOCK_D) in (n, d)
    A = tl.load(A_ptr + nd, mask=mask_nd, other=0.0).to(tl.float32)
    D = tl.load(D_ptr + offs_d, mask=mask_d & HAS_D, other=0.0).to(tl.float32)
    bias = tl.load(bias_ptr + offs_d, mask=mask_d & HAS_BIAS, other=0.0).to(tl.float32)
    row = pid_b * s_b + offs_d * s_d
    col = pid_b * sB_b + offs_n * sB_n
    ckpt = ckpt_ptr + pid_b * n_chunks * d_state * n_channels + nd
    dcol = (pid_b * d_blocks + pid_d) * seq_len * d_state + offs_n   # (BLOCK_N,) into dB, dC
    scratch = scratch_ptr + (pid_b * d_blocks + pid_d) * CHUNK * BLOCK_N * BLOCK_D \
        + offs_n[:, None] * BLOCK_D + tl.arange(0, BLOCK_D)[None, :]
    dh = tl.load(dlast_ptr + pid_b * d_state * n_channels + nd, mask=mask_nd, other=0.0)
    dA = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dD = tl.zeros((BLOCK_D,), dtype=tl.float32)
    dbias = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for c_rev in range(n_chunks):
        c = n_chunks - 1 - c_rev
        t0, t1 = c * CHUNK, tl.minimum(c * CHUNK + CHUNK, seq_len)
        h = tl.load(ckpt + tl.maximum(c - 1, 0) * d_state * n_channels, mask=mask_nd, other=0.0)
        h = tl.where(c > 0, h, 0.0)                                   # h_{t0-1}; h_{-1} = 0
        _recompute_chunk(u_ptr, delta_ptr, B_ptr, C_ptr, bias, A, h, scratch, row, col, t0, t1,
                         s_l, sB_l, mask_d, mask_n, HAS_BIAS, SOFTPLUS, BLOCK_D, BLOCK_N)
        tl.debug_barrier()                   # scratch written by all threads before anyone reads
        for i in tl.range(0, t1 - t0, num_stages=NUM_STAGES):
            t = t1 - 1 - i
            h_prev = tl.load(scratch + (t - t0) * BLOCK_N * BLOCK_D)  # (BLOCK_N, BLOCK_D) h_{t-1}
            u, dt_raw, dt, B, C = _load_step(u_ptr, delta_ptr, B_ptr, C_ptr, bias, row, col, t,
                                             s_l, sB_l, mask_d, mask_n, HAS_BIAS, SOFTPLUS)
            decay = tl.exp(dt[None, :] * A)                           # (BLOCK_N, BLOCK_D)
            h = decay * h_prev + B[:, None] * (dt * u)[None, :]       # h_t
            dy = tl.load(dout_ptr + row + t * s_l, mask=mask_d, other=0.0).to(tl.float32)  # g_t
            if HAS_Z:
                z = tl.load(z_ptr + row + t * s_l, mask=mask_d, other=0.0).to(tl.float32)
                sig = 1.0 / (1.0 + tl.exp(-z))
                y = tl.sum(h * C[:, None], axis=0) + D * u            # D is 0 without HAS_D
                dz = dy * y * sig * (1.0 + z * (1.0 - sig))       # silu' = sig (1 + z (1 - sig))
                tl.store(dz_ptr + row + t * s_l, dz.to(dz_ptr.dtype.element_ty), mask=mask_d)
                dy = dy * z * sig                                     # dL/dy_t
            tl.store(dC_ptr + dcol + t * d_state, tl.sum(h * dy[None, :], axis=1), mask=mask_n)
            dh += C[:, None] * dy[None, :]                            # dL/dh_t complete
            dh_B = tl.sum(dh * B[:, None], axis=0)                    # (BLOCK_D,) <dh_t, B_t>
            dB = tl.sum(dh * (dt * u)[None, :], axis=1)               # (BLOCK_N,) this block's part
            tl.store(dB_ptr + dcol + t * d_state, dB, mask=mask_n)
            dD += dy * u
            dh_decay = dh * h_prev * decay                            # dL/d(delta_t A), elementwise
            ddt = u * dh_B + tl.sum(dh_decay * A, axis=0)             # (BLOCK_D,)
            dA += dh_decay * dt[None, :]
            if SOFTPLUS:
                ddt = ddt / (1.0 + tl.exp(-dt_raw))                   # softplus' = sigmoid
            dbias += ddt
            du = dt * dh_B + dy * D
            tl.store(du_ptr + row + t * s_l, du.to(du_ptr.dtype.element_ty), mask=mask_d)
            tl.store(ddelta_ptr + row + t * s_l, ddt.to(ddelta_ptr.dtype.element_ty), mask=mask_d)
            dh = dh * decay                                           # carried to step t-1
        tl.debug_barrier()                   # all reads done before the next chunk overwrites it
    tl.store(dA_ptr + pid_b * d_state * n_channels + nd, dA, mask=mask_nd)
    tl.store(dD_ptr + pid_b * n_channels + offs_d, dD, mask=mask_d)
    tl.store(dbias_ptr + pid_b * n_channels + offs_d, dbias, mask=mask_d)


# ------------------------------------------------------------------------------------------------
# 5. The autograd function: lay out, allocate, launch, and add up the partial sums

def _like(t, ref):
    """t with the strides of the dense tensor ref (a copy only when they differ)."""
    return t if t.stride() == ref.stride() else torch.empty_like(ref, dtype=t.dtype).copy_(t)


def _layout(u, delta, z, B, C):
    """u in (b, d, l) or (b, l, d) memory, as given; delta and z copied to u's strides where they
    differ; B and C in any strides, as long as they share them."""
    if not (u.is_contiguous() or u.transpose(1, 2).is_contiguous()):
        u = u.contiguous()
    if B.stride() != C.stride():
        B, C = B.contiguous(), C.contiguous()
    return u, _like(delta, u), (_like(z, u) if z is not None else None), B, C


def _launch_args(u, delta, z, A, B, C, D, delta_bias, chunk, block_d):
    """Pointers (absent optional inputs replaced by u, never read), sizes, strides, grid, flags."""
    batch, channels, length = u.shape
    d_state = A.shape[1]
    tensors = [u, delta, z if z is not None else u, A.t().contiguous(), B, C,
               D if D is not None else u, delta_bias if delta_bias is not None else u]
    sizes = (channels, length, d_state, triton.cdiv(length, chunk), *u.stride(), *B.stride())
    grid = (batch, triton.cdiv(channels, block_d))
    flags = dict(HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
                 BLOCK_D=block_d, BLOCK_N=triton.next_power_of_2(d_state), CHUNK=chunk)
    return tensors, sizes, grid, flags


# Each launch is built once, as (grid, arguments, keywords, outputs): tools/mamba_compile.py compiles the same.

def _fwd_launch(u, delta, z, A, B, C, D, delta_bias, softplus, chunk, block_d):
    """The forward kernel's launch; outputs (out, ckpt), allocated here."""
    tensors, sizes, grid, flags = _launch_args(u, delta, z, A, B, C, D, delta_bias, chunk, block_d)
    batch, channels, _ = u.shape
    out = torch.empty_like(u)                                         # (b, d, l), u's strides
    ckpt = u.new_empty(batch, sizes[3], A.shape[1], channels, dtype=torch.float32)  # b c n d
    args = [*tensors[:3], out, *tensors[3:], ckpt, *sizes]
    return grid, args, dict(SOFTPLUS=softplus, **flags, num_warps=NUM_WARPS), (out, ckpt)


def _bwd_launch(u, delta, z, A, B, C, D, delta_bias, ckpt, dout, dlast, softplus, chunk, block_d):
    """The backward kernel's launch; outputs du, ddelta, dz and the partial sums dA, dB, dC, dD,
    d delta_bias, allocated here."""
    tensors, sizes, grid, flags = _launch_args(u, delta, z, A, B, C, D, delta_bias, chunk, block_d)
    batch, channels, length = u.shape
    d_state, d_blocks = A.shape[1], grid[1]
    f32 = dict(dtype=torch.float32, device=u.device)
    scratch = torch.empty(batch, d_blocks, chunk, flags["BLOCK_N"], block_d, **f32)
    du, ddelta = torch.empty_like(u), torch.empty_like(delta)
    dz = torch.empty_like(z) if z is not None else None
    dA = torch.empty(batch, d_state, channels, **f32)                 # partials over b
    dB, dC = (torch.empty(batch, d_blocks, length, d_state, **f32) for _ in range(2))
    dD, dbias = (torch.empty(batch, channels, **f32) for _ in range(2))
    dlast = dlast.float().transpose(1, 2).contiguous()                # (b, n, d)
    args = [*tensors, ckpt, _like(dout, u), dlast, scratch, du, ddelta,
            dz if z is not None else du, dA, dB, dC, dD, dbias, *sizes]
    return (grid, args, dict(SOFTPLUS=softplus, **flags, num_warps=NUM_WARPS),
            (du, ddelta, dz, dA, dB, dC, dD, dbias))


class SelectiveScanFn(torch.autograd.Function):
    """Triton forward and backward of the selective scan. Returns (out, last_state)."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                chunk=CHUNK, block_d=BLOCK_D):
        u, delta, z, B, C = _layout(u, delta, z, B, C)
        grid, args, kwargs, (out, ckpt) = _fwd_launch(u, delta, z, A, B, C, D, delta_bias,
                                                      delta_softplus, chunk, block_d)
        _scan_fwd_kernel[grid](*args, **kwargs)
        ctx.save_for_backward(u, delta, z, A, B, C, D, delta_bias, ckpt)
        ctx.delta_softplus, ctx.chunk, ctx.block_d = delta_softplus, chunk, block_d
        return out, ckpt[:, -1].transpose(1, 2).contiguous()          # (b, d, l), (b, d, n)

    @staticmethod
    def backward(ctx, dout, dlast):
        u, delta, z, A, B, C, D, delta_bias, ckpt = ctx.saved_tensors
        grid, args, kwargs, grads = _bwd_launch(u, delta, z, A, B, C, D, delta_bias, ckpt, dout,
                                                dlast, ctx.delta_softplus, ctx.chunk, ctx.block_d)
        _scan_bwd_kernel[grid](*args, **kwargs)
        du, ddelta, dz, dA, dB, dC, dD, dbias = grads
        return (du, ddelta, dA.sum(0).t().to(A.dtype),
                dB.sum(1).transpose(1, 2).to(B.dtype), dC.sum(1).transpose(1, 2).to(C.dtype),
                dD.sum(0).to(D.dtype) if D is not None else None, dz,
                dbias.sum(0).to(delta_bias.dtype) if delta_bias is not None else None,
                None, None, None)


# ------------------------------------------------------------------------------------------------
# 6. Dispatch: the Triton kernels on CUDA (or on CPU in the interpreter), the CPU scan otherwise

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # read once: kernels are decorated at import
_NOTICES = set()                                          # each refusal is printed once


def kernels_run(u):
    """Whether the Triton kernels take u: on CUDA where kernel_refusal has nothing to say (else
    a one-line notice, once, and the PyTorch scan), on the CPU only in the interpreter."""
    if not u.is_cuda:
        return _INTERPRET and u.device.type == "cpu"
    why = kernel_refusal(u.device, u.dtype)
    if why and why not in _NOTICES:
        _NOTICES.add(why)
        print(f"mamba_triton: {why}: the selective scan runs in PyTorch (selective_scan_cpu), "
              f"slower", file=sys.stderr)
    return not why


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   return_last_state=False):
    """The selective scan; same arguments and results as `selective_scan_ref`. fp16 inputs
    (--amp fp16) run the fp32 kernels: the kernels are built for fp32 and bf16, and keep an fp32
    state whatever the input."""
    check_inputs(u, delta, A, B, C, D, z, delta_bias)
    if not kernels_run(u):
        return selective_scan_cpu(u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                                  return_last_state)
    dtype_in = u.dtype
    if dtype_in == torch.float16:
        u, delta, B, C, z = (t.float() if t is not None else None for t in (u, delta, B, C, z))
    out, last_state = SelectiveScanFn.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    out = out.to(dtype_in)
    return (out, last_state) if return_last_state else out


# ------------------------------------------------------------------------------------------------
# 7. The Mamba block (Gu & Dao 2023, Fig. 3; mamba_ssm/modules/mamba_simple.py)

class Mamba(nn.Module):
    """in_proj -> (x, z); x -> causal depthwise conv -> SiLU -> scan gated by SiLU(z) -> out_proj.

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
        xs = self.conv1d(rearrange(xs, "b l d -> b d l"))[..., :length]  # (b, d, l) causal conv
        xs = rearrange(F.silu(xs), "b d l -> b l d").contiguous()     # (b, l, d) time-major memory
        x_dbl = self.x_proj(xs)                                      # (b, l, r + 2n)
        dt, B, C = x_dbl.split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = F.linear(dt, self.dt_proj.weight)                    # (b, l, d); bias added in scan
        A = -torch.exp(self.A_log.float())                           # (d, n)
        # (b, d, l) and (b, n, l) views of time-major memory: the kernels read them in place
        y = selective_scan(rearrange(xs, "b l d -> b d l"), rearrange(delta, "b l d -> b d l"), A,
                           rearrange(B, "b l n -> b n l"), rearrange(C, "b l n -> b n l"),
                           D=self.D.float(), z=rearrange(z, "b l d -> b d l"),
                           delta_bias=self.dt_proj.bias.float(), delta_softplus=True)  # (b, d, l)
        return self.out_proj(rearrange(y, "b d l -> b l d"))         # (b, l, m)


# ------------------------------------------------------------------------------------------------
# 8. The check against the reference (helpers/scan_check.py): python mamba_triton.py

if __name__ == "__main__":
    from helpers.scan_check import check
    device = "cuda" if torch.cuda.is_available() else "cpu"
    sys.exit(0 if check(device, SelectiveScanFn.apply, selective_scan_ref) else 1)
