"""Tests for tools/mamba_chunked.py: the chunked kernels (Triton interpreter on CPU) against the
reference, output, last state and every gradient; the dispatch between chunked and sequential.

Small chunks (chunk 2 to 4 steps, a segment of 1 to 3 chunks) give several segments, and so every
carry, on sequences short enough for the interpreter.
Run: pytest tests/test_mamba_chunked.py
"""
import pytest
import torch

from tools import mamba_chunked as mc
import mamba_triton as mt
from test_mamba_triton import BF16_TOL, FP32_TOL, NAMES, OPTIONS, make_inputs, reference, run


def check_against_reference(x, softplus, tol, chunk=4, block_d=mt.BLOCK_D, seg_chunks=1):
    kernel = lambda *args: mc.ChunkedScanFn.apply(*args, chunk, block_d, seg_chunks)  # noqa: E731
    out, last, grads = run(kernel, x, softplus)
    ref_out, ref_last, ref_grads = run(reference, x, softplus)
    assert out.dtype == x["u"].dtype and last.dtype == torch.float32
    torch.testing.assert_close(out, ref_out, **tol["out"])
    torch.testing.assert_close(last, ref_last, **tol["out"])
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        assert grads[name].dtype == x[name].dtype, name
        torch.testing.assert_close(grads[name], ref_grads[name], **tol["grad"], msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("option", list(OPTIONS))
def test_chunked_matches_reference_per_optional_input(option, dtype):
    """Each optional input alone, none, and all of them; L = 11: three segments of one chunk of
    4 steps, the last one 3 steps."""
    x = make_inputs(2, 5, 11, 4, dtype, use=("u", "delta", "A", "B", "C") + OPTIONS[option])
    softplus = option in ("softplus", "all")
    check_against_reference(x, softplus, FP32_TOL if dtype == torch.float32 else BF16_TOL)


@pytest.mark.parametrize("b, d, l, n, chunk, block_d, seg_chunks", [
    (2, 12, 19, 4, 4, 32, 2),     # L not a multiple of the chunk: segments of 8, 8, 3 steps
    (2, 6, 16, 4, 4, 32, 2),      # L a multiple of the segment: two segments of two chunks
    (1, 6, 3, 4, 8, 32, None),    # L shorter than one chunk: a single segment
    (2, 5, 1, 3, 4, 32, None),    # one step; N not a power of two
    (1, 37, 9, 3, 4, 32, 1),      # two channel blocks, the second almost empty; N = 3
    (2, 11, 13, 4, 2, 4, 3),      # 3 channel blocks, 7 chunks, segments of 3, 3, 1 chunks
    (1, 4, 70, 4, mt.CHUNK, mt.BLOCK_D, None),  # the default chunk: 3 segments of one chunk
])
def test_chunked_matches_reference_odd_shapes(b, d, l, n, chunk, block_d, seg_chunks):
    x = make_inputs(b, d, l, n, seed=b + d + l)
    check_against_reference(x, True, FP32_TOL, chunk, block_d, seg_chunks)


def test_chunked_reads_strided_views_in_place():
    """Time-major views, as the Mamba block passes them: u, delta (b, d, l) views of (b, l, d)
    memory, z a view of half of a wider tensor, B and C views of one (b, l, r + 2n) tensor."""
    b, d, l, n, r = 2, 6, 9, 4, 3
    g = torch.Generator().manual_seed(3)
    x = make_inputs(b, d, l, n)
    x["u"] = torch.randn(b, l, d, generator=g).transpose(1, 2)                # (b, d, l) view
    x["delta"] = 0.5 * torch.randn(b, l, d, generator=g).transpose(1, 2)
    x["z"] = torch.randn(b, l, 2 * d, generator=g)[..., d:].transpose(1, 2)   # other strides
    x_dbl = torch.randn(b, l, r + 2 * n, generator=g)
    x["B"], x["C"] = x_dbl[..., r:r + n].transpose(1, 2), x_dbl[..., r + n:].transpose(1, 2)
    for name in ("u", "delta", "z", "B", "C"):
        x[name].requires_grad_()
    assert not x["u"].is_contiguous() and x["z"].stride() != x["u"].stride()
    check_against_reference(x, True, FP32_TOL, chunk=2, seg_chunks=2)


def test_chunked_gradcheck_float64():
    """gradcheck against finite differences of the chunked forward (fp32 inside, so the
    tolerances of test_mamba_triton's gradcheck): three segments of one chunk of 2 steps, two
    channel blocks."""
    x = make_inputs(1, 3, 5, 2, dtype=torch.float64)
    args = [x[k].detach().double().requires_grad_() for k in NAMES]
    fn = lambda *a: mc.ChunkedScanFn.apply(*a, True, 2, 2, 1)  # noqa: E731
    assert torch.autograd.gradcheck(fn, args, eps=1e-3, atol=2e-3, rtol=1e-2)


def test_chunked_checkpoints_are_the_sequential_ones():
    """Pass 2 writes the checkpoints that the sequential forward writes (the backward's input)."""
    x = make_inputs(2, 5, 11, 4)
    args = [x[k] for k in NAMES]
    seq = mt.SelectiveScanFn.apply(*args, True, 4)
    chunked = mc.ChunkedScanFn.apply(*args, True, 4, mt.BLOCK_D, 1)
    for s, c in zip(seq, chunked):
        torch.testing.assert_close(c, s, rtol=1e-5, atol=1e-5)
    seq_ckpt, chunked_ckpt = (out.grad_fn.saved_tensors[8] for out, _ in (seq, chunked))
    torch.testing.assert_close(chunked_ckpt, seq_ckpt, rtol=1e-5, atol=1e-5)


def test_segments_fill_programs_and_bound_the_scratch():
    """Enough segments to fill PROGRAMS programs, never more than there are chunks."""
    seg_chunks, n_seg = mc._segments(batch=1, d_blocks=16, n_chunks=512)        # L 16,384
    assert 16 * n_seg <= mc.PROGRAMS and seg_chunks * n_seg >= 512 and n_seg == 128
    assert mc._segments(batch=1, d_blocks=16, n_chunks=3) == (1, 3)             # one chunk each
    assert mc._segments(batch=64, d_blocks=16, n_chunks=7) == (4, 2)            # 2048 programs
    assert mc._segments(batch=256, d_blocks=16, n_chunks=7) == (7, 1)           # full already
    assert mc._segments(batch=1, d_blocks=1, n_chunks=9, seg_chunks=4) == (4, 3)


def test_dispatch_rule():
    """Chunked where the sequential grid fills a quarter of PROGRAMS or less, L 4 chunks or more."""
    assert mc.chunked_is_faster(1, 512, 4096) and mc.chunked_is_faster(32, 512, 4 * mt.CHUNK)
    assert not mc.chunked_is_faster(64, 512, 16384)          # 1,024 programs fill the GPU
    assert not mc.chunked_is_faster(1, 512, 3 * mt.CHUNK)    # too short to split in four


def test_dispatch_chooses_each_path():
    """chunked=True / False force either kernel; None takes the sequential one off CUDA; without
    the interpreter, the CPU scan whatever chunked says."""
    x = make_inputs(2, 5, 9, 4)
    args = [x[k] for k in NAMES]
    kind = lambda out: type(out.grad_fn).__name__  # noqa: E731
    out, last = mc.selective_scan(*args, delta_softplus=True, return_last_state=True, chunked=True)
    assert kind(out) == "ChunkedScanFnBackward" and last.shape == (2, 5, 4)
    c_out, c_last = mc.ChunkedScanFn.apply(*args, True)
    assert torch.equal(out, c_out) and torch.equal(last, c_last)
    assert kind(mc.selective_scan(*args, delta_softplus=True, chunked=False)) \
        == "SelectiveScanFnBackward"
    assert kind(mc.selective_scan(*args, delta_softplus=True)) == "SelectiveScanFnBackward"


def test_dispatch_without_the_interpreter_takes_the_cpu_scan(monkeypatch):
    monkeypatch.setattr(mt, "_INTERPRET", False)
    x = make_inputs(2, 5, 7, 4)
    args = [x[k] for k in NAMES]
    out = mc.selective_scan(*args, delta_softplus=True, chunked=True)
    assert "ScanFn" not in type(out.grad_fn).__name__
    assert torch.equal(out, mt.selective_scan_cpu(*args, delta_softplus=True))
