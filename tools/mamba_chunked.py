"""The selective scan chunked in time: two passes over the sequence instead of one, forward and
backward, in Triton, and the dispatch that chooses it or the sequential scan of mamba_triton.py.

Read mamba_triton.py first: this file is its next rung and reuses its pieces (the per-step loads,
the recomputation of a chunk's states, the layout of the inputs, the checkpoints). Its kernels
give each program one batch element and BLOCK_D channels, as there, but also only one segment of
the sequence, so that a short batch of long sequences still fills the GPU. The scan's state
passes from one segment to the next through a carry, which is what the two passes are for.

The forward (h_t = a_t h_{t-1} + x_t, a_t = exp(delta_t A), x_t = delta_t u_t B_t). Split the
sequence into segments of whole checkpoint chunks (CHUNK steps each; "segment" keeps the word
chunk for those). For segment s over steps t0 .. t1-1:

    pass 1   e_s = the state at t1-1 scanned from h_{t0-1} = 0;  S_s = sum_t delta_t
    carry    H_0 = 0,  H_{s+1} = exp(A S_s) H_s + e_s         H_s = h_{t0-1}, the state s receives
    pass 2   rescan from H_s, writing the outputs and the checkpoints every CHUNK steps

exp(A S_s) is the product of the segment's a_t. The backward runs the adjoint
dh_t = C_t dy_t + a_{t+1} dh_{t+1} (mamba_triton.py, section 4) the same way, in reverse:

    pass 1   g_s = a_{t0} dh_{t0} scanned back from the segment's end with nothing received
    carry    G_last = dL/dh_last,  G_{s-1} = exp(A S_s) G_s + g_s    G_s = a_{t1} dh_{t1}
    pass 2   the sequential backward over the segment's chunks from G_s and the checkpoints,
             every gradient; dA, dD and d delta_bias as partials per segment, summed by PyTorch

The price: pass 1 reads the inputs a second time, forward and backward, and the carry is a short
sequential loop over segments; the gain: batch x channel blocks x segments programs instead of
batch x channel blocks. Segments are as many as fill PROGRAMS programs, which also bounds the
backward's scratch memory (CHUNK states per program).

Run:  python mamba_triton.py     the sequential kernels against the reference
      python -m tools.mamba_bench      timings on a GPU, sequential against chunked
Test: pytest tests/test_mamba_chunked.py   (CPU, kernels in the Triton interpreter)
      pytest tests/test_compile.py         (CPU, every kernel compiled for sm_80, sm_90)
"""
import torch
import triton
import triton.language as tl

import mamba_triton as mt
from helpers.scan_cpu import check_inputs
from mamba_triton import (BLOCK_D, CHUNK, NUM_STAGES, NUM_WARPS, _launch_args, _layout, _like, _load_step,
                          _recompute_chunk)

# Programs that fill a GPU: 132 SMs (H100) x 16 resident one-warp programs, about as many as
# the registers allow. A guess, to be checked by tools/mamba_bench.py's table of both scans.
PROGRAMS = 2048

# ------------------------------------------------------------------------------------------------
# 1. The forward: pass 1, the carry, pass 2


@triton.jit
def _channels(A_ptr, D_ptr, bias_ptr, n_channels, d_state, HAS_D: tl.constexpr,
              HAS_BIAS: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    """This program's channels (grid axis 1), as every kernel here sets them up: offsets, masks,
    (n, d) offsets, A (BLOCK_N, BLOCK_D), D and delta_bias (BLOCK_D,), zeros where absent."""
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)      # (BLOCK_D,)
    offs_n = tl.arange(0, BLOCK_N)                                   # (BLOCK_N,)
    mask_d, mask_n = offs_d < n_channels, offs_n < d_state
    mask_nd = mask_n[:, None] & mask_d[None, :]                      # (BLOCK_N, BLOCK_D)
    nd = offs_n[:, None] * n_channels + offs_d[None, :]              # (BLOCK_N, BLOCK_D) in (n, d)
    A = tl.load(A_ptr + nd, mask=mask_nd, other=0.0).to(tl.float32)
    D = tl.load(D_ptr + offs_d, mask=mask_d & HAS_D, other=0.0).to(tl.float32)
    bias = tl.load(bias_ptr + offs_d, mask=mask_d & HAS_BIAS, other=0.0).to(tl.float32)
    return offs_d, offs_n, mask_d, mask_n, mask_nd, nd, A, D, bias


@triton.jit
def _segment_end_kernel(
    u_ptr, delta_ptr, z_ptr, A_ptr, B_ptr, C_ptr, D_ptr, bias_ptr,   # as in _scan_fwd_kernel
    end_ptr,        # (b, n_seg, n, d) fp32 out: e_s, the segment's last state scanned from 0
    dtsum_ptr,      # (b, n_seg, d) fp32 out: S_s, the segment's sum of delta (after softplus)
    n_channels, seq_len, d_state, n_chunks, s_b, s_d, s_l, sB_b, sB_n, sB_l,  # as there
    seg_chunks,     # checkpoint chunks per segment
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr,
):
    """Pass 1 of the forward; grid (b, channel blocks, segments)."""
    pid_b, pid_s, n_seg = tl.program_id(0).to(tl.int64), tl.program_id(2), tl.num_programs(2)
    offs_d, offs_n, mask_d, mask_n, mask_nd, nd, A, D, bias = _channels(
        A_ptr, D_ptr, bias_ptr, n_channels, d_state, HAS_D, HAS_BIAS, BLOCK_D, BLOCK_N)
    row, col = pid_b * s_b + offs_d * s_d, pid_b * sB_b + offs_n * sB_n
    t0 = pid_s * seg_chunks * CHUNK
    h = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)               # nothing received
    dtsum = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for t in tl.range(t0, tl.minimum(t0 + seg_chunks * CHUNK, seq_len), num_stages=NUM_STAGES):
        u, dt_raw, dt, B, C = _load_step(u_ptr, delta_ptr, B_ptr, C_ptr, bias, row, col, t, s_l,
                                         sB_l, mask_d, mask_n, HAS_BIAS, SOFTPLUS)  # C unused
        h = tl.exp(dt[None, :] * A) * h + B[:, None] * (dt * u)[None, :]  # h_t
        dtsum += dt
    seg = pid_b * n_seg + pid_s
    tl.store(end_ptr + seg * d_state * n_channels + nd, h, mask=mask_nd)
    tl.store(dtsum_ptr + seg * n_channels + offs_d, dtsum, mask=mask_d)


@triton.jit
def _segment_carry_kernel(
    seg_ptr,        # (b, n_seg, n, d) fp32: in, each segment's own part (e_s or g_s);
    #                 out, what it receives from the others (H_s or G_s)
    dtsum_ptr,      # (b, n_seg, d) fp32: S_s; the segment's decay is exp(A S_s)
    A_ptr,          # (n, d) A transposed
    init_ptr,       # (b, n, d) fp32: what the first segment of the walk receives (H_0, G_last)
    n_channels, d_state, n_seg,
    REVERSE: tl.constexpr,   # walk from the last segment to the first: the backward's carry
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """The carry between segments, in place; grid (b, channel blocks). n_seg steps of one
    multiply-add on the (n, d) state: short beside the passes."""
    pid_b = tl.program_id(0).to(tl.int64)
    offs_d, offs_n, mask_d, mask_n, mask_nd, nd, A, D, bias = _channels(
        A_ptr, A_ptr, A_ptr, n_channels, d_state, False, False, BLOCK_D, BLOCK_N)
    carry = tl.load(init_ptr + pid_b * d_state * n_channels + nd, mask=mask_nd, other=0.0)
    for i in tl.range(0, n_seg, num_stages=NUM_STAGES):
        if REVERSE:
            s = n_seg - 1 - i
        else:
            s = i
        seg = seg_ptr + (pid_b * n_seg + s) * d_state * n_channels + nd
        own = tl.load(seg, mask=mask_nd, other=0.0)                  # (BLOCK_N, BLOCK_D)
        tl.store(seg, carry, mask=mask_nd)
        dtsum = tl.load(dtsum_ptr + (pid_b * n_seg + s) * n_channels + offs_d, mask=mask_d,
                        other=0.0)                                   # (BLOCK_D,)
        carry = tl.exp(dtsum[None, :] * A) * carry + own


@triton.jit
def _segment_out_kernel(
    u_ptr, delta_ptr, z_ptr, A_ptr, B_ptr, C_ptr, D_ptr, bias_ptr,   # as in _scan_fwd_kernel
    out_ptr,        # (b, d, l) output in u's dtype and strides
    start_ptr,      # (b, n_seg, n, d) fp32: H_s, the state before each segment (the carry's)
    ckpt_ptr,       # (b, n_chunks, n, d) fp32 out: the checkpoints, as _scan_fwd_kernel's
    n_channels, seq_len, d_state, n_chunks, s_b, s_d, s_l, sB_b, sB_n, sB_l, seg_chunks,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr,
):
    """Pass 2 of the forward: _scan_fwd_kernel over one segment's chunks, from H_s."""
    pid_b, pid_s, n_seg = tl.program_id(0).to(tl.int64), tl.program_id(2), tl.num_programs(2)
    offs_d, offs_n, mask_d, mask_n, mask_nd, nd, A, D, bias = _channels(
        A_ptr, D_ptr, bias_ptr, n_channels, d_state, HAS_D, HAS_BIAS, BLOCK_D, BLOCK_N)
    row, col = pid_b * s_b + offs_d * s_d, pid_b * sB_b + offs_n * sB_n
    ckpt = ckpt_ptr + pid_b * n_chunks * d_state * n_channels + nd
    h = tl.load(start_ptr + (pid_b * n_seg + pid_s) * d_state * n_channels + nd, mask=mask_nd,
                other=0.0)                                           # H_s = h_{t0-1}
    c0 = pid_s * seg_chunks
    for c in range(c0, tl.minimum(c0 + seg_chunks, n_chunks)):
        for t in tl.range(c * CHUNK, tl.minimum(c * CHUNK + CHUNK, seq_len),
                          num_stages=NUM_STAGES):
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
# 2. The backward: pass 1 (the adjoint alone), the carry in reverse, pass 2 (every gradient)


@triton.jit
def _segment_adjoint_kernel(
    u_ptr, delta_ptr, z_ptr, A_ptr, B_ptr, C_ptr, D_ptr, bias_ptr,   # the forward's inputs
    dout_ptr,       # (b, d, l) dL/dout, u's strides
    adj_ptr,        # (b, n_seg, n, d) fp32 out: g_s = a_{t0} dh_{t0} with nothing received
    n_channels, seq_len, d_state, n_chunks, s_b, s_d, s_l, sB_b, sB_n, sB_l, seg_chunks,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr,
):
    """Pass 1 of the backward: dh_t = C_t dy_t + a_{t+1} dh_{t+1} back over the segment. It
    needs no state, so no checkpoint: only delta, C, dout and z are read (the compiler drops
    _load_step's loads of u and B, which nothing uses)."""
    pid_b, pid_s, n_seg = tl.program_id(0).to(tl.int64), tl.program_id(2), tl.num_programs(2)
    offs_d, offs_n, mask_d, mask_n, mask_nd, nd, A, D, bias = _channels(
        A_ptr, D_ptr, bias_ptr, n_channels, d_state, HAS_D, HAS_BIAS, BLOCK_D, BLOCK_N)
    row, col = pid_b * s_b + offs_d * s_d, pid_b * sB_b + offs_n * sB_n
    t0 = pid_s * seg_chunks * CHUNK
    t1 = tl.minimum(t0 + seg_chunks * CHUNK, seq_len)
    dh = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)              # nothing received
    for i in tl.range(0, t1 - t0, num_stages=NUM_STAGES):
        t = t1 - 1 - i
        u, dt_raw, dt, B, C = _load_step(u_ptr, delta_ptr, B_ptr, C_ptr, bias, row, col, t, s_l,
                                         sB_l, mask_d, mask_n, HAS_BIAS, SOFTPLUS)
        dy = tl.load(dout_ptr + row + t * s_l, mask=mask_d, other=0.0).to(tl.float32)  # g_t
        if HAS_Z:
            z = tl.load(z_ptr + row + t * s_l, mask=mask_d, other=0.0).to(tl.float32)
            dy = dy * z / (1.0 + tl.exp(-z))                          # dL/dy_t = g_t silu(z_t)
        dh = (dh + C[:, None] * dy[None, :]) * tl.exp(dt[None, :] * A)  # a_t dh_t, to step t-1
    tl.store(adj_ptr + (pid_b * n_seg + pid_s) * d_state * n_channels + nd, dh, mask=mask_nd)


@triton.jit
def _chunk_grads(u_ptr, delta_ptr, z_ptr, B_ptr, C_ptr, dout_ptr, du_ptr, ddelta_ptr, dz_ptr,
                 dB_ptr, dC_ptr, A, D, bias, h, dh, dA, dD, dbias, scratch, row, col, dcol,
                 t0, t1, s_l, sB_l, d_state, mask_d, mask_n, HAS_Z: tl.constexpr,
                 HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, BLOCK_D: tl.constexpr,
                 BLOCK_N: tl.constexpr):
    """Steps t1-1 down to t0 of _scan_bwd_kernel's loop (its equations, mamba_triton.py section
    4), from h = h_{t0-1} and dh = a_{t1} dh_{t1}. Stores du, ddelta, dz, this block's dB and
    dC; returns a_{t0} dh_{t0} and the running sums dA, dD, d delta_bias."""
    _recompute_chunk(u_ptr, delta_ptr, B_ptr, C_ptr, bias, A, h, scratch, row, col, t0, t1,
                     s_l, sB_l, mask_d, mask_n, HAS_BIAS, SOFTPLUS, BLOCK_D, BLOCK_N)
    tl.debug_barrier()                       # scratch written by all threads before anyone reads
    for i in tl.range(0, t1 - t0, num_stages=NUM_STAGES):
        t = t1 - 1 - i
        h_prev = tl.load(scratch + (t - t0) * BLOCK_N * BLOCK_D)      # (BLOCK_N, BLOCK_D) h_{t-1}
        u, dt_raw, dt, B, C = _load_step(u_ptr, delta_ptr, B_ptr, C_ptr, bias, row, col, t,
                                         s_l, sB_l, mask_d, mask_n, HAS_BIAS, SOFTPLUS)
        decay = tl.exp(dt[None, :] * A)                               # (BLOCK_N, BLOCK_D)
        h_t = decay * h_prev + B[:, None] * (dt * u)[None, :]
        dy = tl.load(dout_ptr + row + t * s_l, mask=mask_d, other=0.0).to(tl.float32)  # g_t
        if HAS_Z:
            z = tl.load(z_ptr + row + t * s_l, mask=mask_d, other=0.0).to(tl.float32)
            sig = 1.0 / (1.0 + tl.exp(-z))
            y = tl.sum(h_t * C[:, None], axis=0) + D * u              # D is 0 without HAS_D
            dz = dy * y * sig * (1.0 + z * (1.0 - sig))           # silu' = sig (1 + z (1 - sig))
            tl.store(dz_ptr + row + t * s_l, dz.to(dz_ptr.dtype.element_ty), mask=mask_d)
            dy = dy * z * sig                                         # dL/dy_t
        tl.store(dC_ptr + dcol + t * d_state, tl.sum(h_t * dy[None, :], axis=1), mask=mask_n)
        dh += C[:, None] * dy[None, :]                                # dL/dh_t complete
        dh_B = tl.sum(dh * B[:, None], axis=0)                        # (BLOCK_D,) <dh_t, B_t>
        tl.store(dB_ptr + dcol + t * d_state, tl.sum(dh * (dt * u)[None, :], axis=1), mask=mask_n)
        dD += dy * u
        dh_decay = dh * h_prev * decay                                # dL/d(delta_t A)
        ddt = u * dh_B + tl.sum(dh_decay * A, axis=0)                 # (BLOCK_D,)
        dA += dh_decay * dt[None, :]
        if SOFTPLUS:
            ddt = ddt / (1.0 + tl.exp(-dt_raw))                       # softplus' = sigmoid
        dbias += ddt
        du = dt * dh_B + dy * D
        tl.store(du_ptr + row + t * s_l, du.to(du_ptr.dtype.element_ty), mask=mask_d)
        tl.store(ddelta_ptr + row + t * s_l, ddt.to(ddelta_ptr.dtype.element_ty), mask=mask_d)
        dh = dh * decay                                               # carried to step t-1
    tl.debug_barrier()                       # all reads done before the next chunk overwrites it
    return dh, dA, dD, dbias


@triton.jit
def _segment_grad_kernel(
    u_ptr, delta_ptr, z_ptr, A_ptr, B_ptr, C_ptr, D_ptr, bias_ptr,   # the forward's inputs
    ckpt_ptr,       # (b, n_chunks, n, d) fp32 checkpoints written by _segment_out_kernel
    dout_ptr,       # (b, d, l) dL/dout, u's strides
    adj_ptr,        # (b, n_seg, n, d) fp32: G_s, what each segment receives (the carry's)
    scratch_ptr,    # (b, d_blocks, n_seg, CHUNK, BLOCK_N, BLOCK_D) fp32, one slab per program
    du_ptr, ddelta_ptr, dz_ptr,     # (b, d, l) gradients in u's strides, each in its input's dtype
    dA_ptr,         # (b, n_seg, n, d) fp32 partial dA of each segment
    dB_ptr, dC_ptr,  # (b, d_blocks, l, n) fp32 partial dB, dC of each channel block
    dD_ptr, dbias_ptr,  # (b, n_seg, d) fp32 partial dD, d delta_bias of each segment
    n_channels, seq_len, d_state, n_chunks, s_b, s_d, s_l, sB_b, sB_n, sB_l, seg_chunks,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr,
):
    """Pass 2 of the backward: _scan_bwd_kernel over one segment's chunks, from G_s."""
    pid_b, pid_d, pid_s = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.program_id(2)
    d_blocks, n_seg = tl.num_programs(1), tl.num_programs(2)
    offs_d, offs_n, mask_d, mask_n, mask_nd, nd, A, D, bias = _channels(
        A_ptr, D_ptr, bias_ptr, n_channels, d_state, HAS_D, HAS_BIAS, BLOCK_D, BLOCK_N)
    row, col = pid_b * s_b + offs_d * s_d, pid_b * sB_b + offs_n * sB_n
    ckpt = ckpt_ptr + pid_b * n_chunks * d_state * n_channels + nd
    dcol = (pid_b * d_blocks + pid_d) * seq_len * d_state + offs_n   # (BLOCK_N,) into dB, dC
    scratch = scratch_ptr + ((pid_b * d_blocks + pid_d) * n_seg + pid_s) * CHUNK * BLOCK_N \
        * BLOCK_D + offs_n[:, None] * BLOCK_D + tl.arange(0, BLOCK_D)[None, :]
    seg = pid_b * n_seg + pid_s
    dh = tl.load(adj_ptr + seg * d_state * n_channels + nd, mask=mask_nd, other=0.0)  # G_s
    dA = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dD = tl.zeros((BLOCK_D,), dtype=tl.float32)
    dbias = tl.zeros((BLOCK_D,), dtype=tl.float32)
    c0 = pid_s * seg_chunks
    c1 = tl.minimum(c0 + seg_chunks, n_chunks)
    for i in range(0, c1 - c0):
        c = c1 - 1 - i
        h = tl.load(ckpt + tl.maximum(c - 1, 0) * d_state * n_channels, mask=mask_nd, other=0.0)
        h = tl.where(c > 0, h, 0.0)                                   # h_{t0-1}; h_{-1} = 0
        dh, dA, dD, dbias = _chunk_grads(
            u_ptr, delta_ptr, z_ptr, B_ptr, C_ptr, dout_ptr, du_ptr, ddelta_ptr, dz_ptr, dB_ptr,
            dC_ptr, A, D, bias, h, dh, dA, dD, dbias, scratch, row, col, dcol, c * CHUNK,
            tl.minimum(c * CHUNK + CHUNK, seq_len), s_l, sB_l, d_state, mask_d, mask_n, HAS_Z,
            HAS_BIAS, SOFTPLUS, BLOCK_D, BLOCK_N)
    tl.store(dA_ptr + seg * d_state * n_channels + nd, dA, mask=mask_nd)
    tl.store(dD_ptr + seg * n_channels + offs_d, dD, mask=mask_d)
    tl.store(dbias_ptr + seg * n_channels + offs_d, dbias, mask=mask_d)


# ------------------------------------------------------------------------------------------------
# 3. The launches and the autograd function


def _segments(batch, d_blocks, n_chunks, seg_chunks=None):
    """(checkpoint chunks per segment, segments): seg_chunks as given, or as few per segment as
    make batch x channel blocks x segments about PROGRAMS."""
    if seg_chunks is None:
        n_seg = min(n_chunks, max(1, PROGRAMS // (batch * d_blocks)))
        seg_chunks = triton.cdiv(n_chunks, n_seg)
    return seg_chunks, triton.cdiv(n_chunks, seg_chunks)


# Each pass's launches are built in one place, as [(kernel, grid, arguments, keywords)] in the
# order they run: ChunkedScanFn runs them, tools/mamba_compile.py compiles exactly the same ones.

def _fwd_launches(u, delta, z, A, B, C, D, delta_bias, softplus, chunk, block_d, seg_chunks):
    """The forward's three launches; outputs (out, ckpt, dtsum) and seg_chunks, allocated and
    chosen here."""
    tensors, sizes, grid, flags = _launch_args(u, delta, z, A, B, C, D, delta_bias, chunk, block_d)
    batch, channels, _ = u.shape
    d_state, n_chunks = A.shape[1], sizes[3]
    seg_chunks, n_seg = _segments(batch, grid[1], n_chunks, seg_chunks)
    f32 = dict(dtype=torch.float32, device=u.device)
    seg = torch.empty(batch, n_seg, d_state, channels, **f32)        # e_s, then H_s
    dtsum = torch.empty(batch, n_seg, channels, **f32)                # S_s
    out = torch.empty_like(u)                                         # (b, d, l), u's strides
    ckpt = torch.empty(batch, n_chunks, d_state, channels, **f32)     # b c n d
    kw = dict(SOFTPLUS=softplus, **flags, num_warps=NUM_WARPS)
    carry_kw = dict(REVERSE=False, BLOCK_D=block_d, BLOCK_N=flags["BLOCK_N"], num_warps=NUM_WARPS)
    h0 = torch.zeros(batch, d_state, channels, **f32)                 # (b, n, d) h_{-1} = 0
    launches = [
        (_segment_end_kernel, (*grid, n_seg), [*tensors, seg, dtsum, *sizes, seg_chunks], kw),
        (_segment_carry_kernel, grid, [seg, dtsum, tensors[3], h0, channels, d_state, n_seg],
         carry_kw),
        (_segment_out_kernel, (*grid, n_seg), [*tensors, out, seg, ckpt, *sizes, seg_chunks], kw)]
    return launches, (out, ckpt, dtsum), seg_chunks


def _bwd_launches(u, delta, z, A, B, C, D, delta_bias, ckpt, dtsum, seg_chunks, dout, dlast,
                  softplus, chunk, block_d):
    """The backward's three launches; outputs du, ddelta, dz and the partial sums dA, dB, dC, dD,
    d delta_bias, allocated here."""
    tensors, sizes, grid, flags = _launch_args(u, delta, z, A, B, C, D, delta_bias, chunk, block_d)
    batch, channels, length = u.shape
    d_state, d_blocks, n_seg = A.shape[1], grid[1], dtsum.shape[1]
    f32 = dict(dtype=torch.float32, device=u.device)
    adj = torch.empty(batch, n_seg, d_state, channels, **f32)         # g_s, then G_s
    scratch = torch.empty(batch, d_blocks, n_seg, chunk, flags["BLOCK_N"], block_d, **f32)
    du, ddelta = torch.empty_like(u), torch.empty_like(delta)
    dz = torch.empty_like(z) if z is not None else None
    dA = torch.empty(batch, n_seg, d_state, channels, **f32)          # partials over b, segments
    dB, dC = (torch.empty(batch, d_blocks, length, d_state, **f32) for _ in range(2))
    dD, dbias = (torch.empty(batch, n_seg, channels, **f32) for _ in range(2))
    dlast = dlast.float().transpose(1, 2).contiguous()                # (b, n, d) G_last
    dout = _like(dout, u)
    kw = dict(SOFTPLUS=softplus, **flags, num_warps=NUM_WARPS)
    carry_kw = dict(REVERSE=True, BLOCK_D=block_d, BLOCK_N=flags["BLOCK_N"], num_warps=NUM_WARPS)
    launches = [
        (_segment_adjoint_kernel, (*grid, n_seg), [*tensors, dout, adj, *sizes, seg_chunks], kw),
        (_segment_carry_kernel, grid, [adj, dtsum, tensors[3], dlast, channels, d_state, n_seg],
         carry_kw),
        (_segment_grad_kernel, (*grid, n_seg),
         [*tensors, ckpt, dout, adj, scratch, du, ddelta, dz if z is not None else du, dA, dB, dC,
          dD, dbias, *sizes, seg_chunks], kw)]
    return launches, (du, ddelta, dz, dA, dB, dC, dD, dbias)


def _run(launches):
    for kernel, grid, args, kwargs in launches:
        kernel[grid](*args, **kwargs)


class ChunkedScanFn(torch.autograd.Function):
    """The chunked Triton forward and backward of the selective scan; arguments as
    SelectiveScanFn's, and seg_chunks: checkpoint chunks per segment (None: fill PROGRAMS).
    Returns (out, last_state)."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                chunk=CHUNK, block_d=BLOCK_D, seg_chunks=None):
        u, delta, z, B, C = _layout(u, delta, z, B, C)
        launches, (out, ckpt, dtsum), seg_chunks = _fwd_launches(
            u, delta, z, A, B, C, D, delta_bias, delta_softplus, chunk, block_d, seg_chunks)
        _run(launches)
        ctx.save_for_backward(u, delta, z, A, B, C, D, delta_bias, ckpt, dtsum)
        ctx.settings = delta_softplus, chunk, block_d, seg_chunks
        return out, ckpt[:, -1].transpose(1, 2).contiguous()          # (b, d, l), (b, d, n)

    @staticmethod
    def backward(ctx, dout, dlast):
        u, delta, z, A, B, C, D, delta_bias, ckpt, dtsum = ctx.saved_tensors
        softplus, chunk, block_d, seg_chunks = ctx.settings
        launches, grads = _bwd_launches(u, delta, z, A, B, C, D, delta_bias, ckpt, dtsum,
                                        seg_chunks, dout, dlast, softplus, chunk, block_d)
        _run(launches)
        du, ddelta, dz, dA, dB, dC, dD, dbias = grads
        return (du, ddelta, dA.sum((0, 1)).t().to(A.dtype),
                dB.sum(1).transpose(1, 2).to(B.dtype), dC.sum(1).transpose(1, 2).to(C.dtype),
                dD.sum((0, 1)).to(D.dtype) if D is not None else None, dz,
                dbias.sum((0, 1)).to(delta_bias.dtype) if delta_bias is not None else None,
                None, None, None, None)


# ------------------------------------------------------------------------------------------------
# 4. Dispatch: chunked where it is faster, else mamba_triton.selective_scan
#
# The rule, a guess until tools/mamba_bench.py's table of both scans confirms it: the sequential kernel
# runs batch x channel blocks one-warp programs, each a chain of dependent steps as long as L. Its
# speed is one step's latency times L as long as too few programs run to hide it, so it is slow
# where those programs fill a quarter of PROGRAMS or less. The chunked scan then splits the
# sequence into 4 or more segments, enough to repay its extra pass over the inputs, provided L
# holds 4 checkpoint chunks. A long L alone is no reason: with the GPU full, the extra pass costs.


def chunked_is_faster(batch, channels, length, chunk=CHUNK, block_d=BLOCK_D):
    """Whether the rule above picks the chunked scan for u of shape (batch, channels, length)."""
    programs = batch * triton.cdiv(channels, block_d)
    return 4 * programs <= PROGRAMS and length >= 4 * chunk


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   return_last_state=False, chunked=None):
    """The selective scan; arguments and results as `mamba_triton.selective_scan_ref`.

    chunked: None, the chunked kernels on CUDA where `chunked_is_faster`; True or False, the
    chunked or the sequential kernels wherever kernels run (CUDA, or the CPU under
    TRITON_INTERPRET=1). Elsewhere the CPU scan (helpers/scan_cpu.py), whatever chunked says.
    """
    check_inputs(u, delta, A, B, C, D, z, delta_bias)
    if chunked is None:
        chunked = u.is_cuda and chunked_is_faster(*u.shape)
    if not (chunked and u.dtype != torch.float16 and mt.kernels_run(u)):  # fp16: the sequential kernels in fp32
        return mt.selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                                 return_last_state)
    out, last_state = ChunkedScanFn.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    return (out, last_state) if return_last_state else out
