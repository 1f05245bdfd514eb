"""Tests for mamba_triton.py: the reference against hand-worked values, and the Mamba block.

Run: pytest tests/test_mamba_triton.py   (conftest.py switches Triton to its CPU interpreter)
"""
import math
import types

import pytest
import torch
import torch.nn.functional as F

import mamba_triton as mt


def test_reference_matches_hand_worked_scan():
    """One channel, N = 1, A = -1, B = C = 1, delta = 1: an impulse decays as exp(-t)."""
    u = torch.tensor([[[1.0, 0.0, 0.0]]])                            # (b, d, l) = (1, 1, 3)
    ones = torch.ones(1, 1, 3)
    A = torch.tensor([[-1.0]])
    out, last = mt.selective_scan_ref(u, ones, A, ones, ones, D=torch.tensor([2.0]),
                                      return_last_state=True)
    expected = torch.tensor([1.0 + 2.0, math.exp(-1), math.exp(-2)])
    torch.testing.assert_close(out[0, 0], expected)
    torch.testing.assert_close(last, torch.tensor([[[math.exp(-2)]]]))
    # z gates the output by silu(z); delta_bias and softplus act on delta before the step
    z = torch.full((1, 1, 3), 2.0)
    gated = mt.selective_scan_ref(u, ones, A, ones, ones, z=z)
    torch.testing.assert_close(gated[0, 0], expected.sub(torch.tensor([2.0, 0, 0])) * F.silu(z[0, 0]))
    raw = torch.zeros(1, 1, 3)
    soft = mt.selective_scan_ref(u, raw, A, ones, ones, delta_bias=torch.tensor([0.5]),
                                 delta_softplus=True)
    step = F.softplus(torch.tensor(0.5))
    torch.testing.assert_close(soft[0, 0, 0], step)                  # delta_0 * B * u = softplus(.5)
    torch.testing.assert_close(soft[0, 0, 2], step * torch.exp(-2 * step))


def test_mamba_parameter_count():
    block = mt.Mamba(256, d_state=16, d_conv=4, expand=2)
    assert sum(p.numel() for p in block.parameters()) == 437_760


def test_mamba_init():
    """softplus(dt_proj.bias) lies in [dt_min, dt_max]; A = -(1..N) for every channel; D = 1."""
    block = mt.Mamba(32, d_state=4, dt_min=1e-3, dt_max=1e-1)
    dt = F.softplus(block.dt_proj.bias)
    assert dt.min() >= 1e-3 * 0.999 and dt.max() <= 1e-1 * 1.001
    torch.testing.assert_close(-torch.exp(block.A_log), -torch.arange(1.0, 5.0).expand(64, 4))
    assert torch.equal(block.D, torch.ones(64))


def test_mamba_is_causal():
    """Changing the inputs after step t leaves the outputs up to t unchanged, and changes later ones."""
    torch.manual_seed(0)
    block = mt.Mamba(16, d_state=4)
    x = torch.randn(2, 9, 16)
    t = 4
    x2 = x.clone()
    x2[:, t + 1:] = torch.randn(2, 9 - t - 1, 16)
    y, y2 = block(x), block(x2)
    assert y.shape == (2, 9, 16)
    torch.testing.assert_close(y[:, :t + 1], y2[:, :t + 1], rtol=0, atol=1e-6)
    assert (y[:, t + 1:] - y2[:, t + 1:]).abs().max() > 1e-3


# ------------------------------------------------------------------------------------------------
# The Triton kernels (interpreter on CPU) against the reference: output, last state, every gradient

# The errors these bound, as measured: docs/benchmarks.md#the-kernels-on-the-cpu
FP32_TOL = dict(out=dict(rtol=6e-4, atol=2e-3), grad=dict(rtol=2e-3, atol=6e-3))
BF16_TOL = dict(out=dict(rtol=3e-2, atol=5e-2), grad=dict(rtol=3e-2, atol=5e-2))
NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def make_inputs(b, d, l, n, dtype=torch.float32, seed=0, use=NAMES):
    """Random scan inputs; u, delta, B, C, z in `dtype`, A, D, delta_bias in fp32 (as in the block)."""
    g = torch.Generator().manual_seed(seed)
    shapes = dict(u=(b, d, l), delta=(b, d, l), A=(d, n), B=(b, n, l), C=(b, n, l), D=(d,),
                  z=(b, d, l), delta_bias=(d,))
    x = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    x["delta"] = 0.5 * x["delta"]
    x["A"] = -0.5 - torch.rand(d, n, generator=g)                     # negative: a decaying state
    x["delta_bias"] = 0.3 * x["delta_bias"]
    low = ("A", "D", "delta_bias")
    return {k: (v if k in low else v.to(dtype)).requires_grad_() if k in use else None
            for k, v in x.items()}


def run(fn, x, softplus, seed=1):
    """Out, last state, and the gradients of a random linear function of both."""
    for v in x.values():
        if v is not None:
            v.grad = None
    out, last = fn(*(x[k] for k in NAMES), softplus)
    g = torch.Generator().manual_seed(seed)
    loss = (out.float() * torch.randn(out.shape, generator=g)).sum() \
        + (last * torch.randn(last.shape, generator=g)).sum()
    loss.backward()
    return out, last, {k: v.grad for k, v in x.items() if v is not None}


def reference(*args):
    return mt.selective_scan_ref(*args, return_last_state=True)


def check_against_reference(x, softplus, tol, chunk=mt.CHUNK, block_d=mt.BLOCK_D):
    kernel = lambda *args: mt.SelectiveScanFn.apply(*args, chunk, block_d)  # noqa: E731
    out, last, grads = run(kernel, x, softplus)
    ref_out, ref_last, ref_grads = run(reference, x, softplus)
    assert out.dtype == x["u"].dtype and last.dtype == torch.float32
    torch.testing.assert_close(out, ref_out, **tol["out"])
    torch.testing.assert_close(last, ref_last, **tol["out"])
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        assert grads[name].dtype == x[name].dtype, name
        torch.testing.assert_close(grads[name], ref_grads[name], **tol["grad"], msg=name)


OPTIONS = {"none": (), "D": ("D",), "z": ("z",), "bias": ("delta_bias",), "softplus": (),
           "all": ("D", "z", "delta_bias")}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("option", list(OPTIONS))
def test_kernel_matches_reference_per_optional_input(option, dtype):
    """Each optional input alone, none, and all of them; odd sizes (5 channels, L = 7 < CHUNK)."""
    x = make_inputs(2, 5, 7, 4, dtype, use=("u", "delta", "A", "B", "C") + OPTIONS[option])
    softplus = option in ("softplus", "all")
    check_against_reference(x, softplus, FP32_TOL if dtype == torch.float32 else BF16_TOL)


@pytest.mark.parametrize("b, d, l, n, chunk, block_d", [
    (2, 12, 19, 4, 8, 32),    # L not a multiple of the chunk: 8 + 8 + 3 steps
    (2, 6, 16, 4, 8, 32),     # L an exact multiple of the chunk
    (1, 37, 9, 3, 4, 32),     # two channel blocks, the second almost empty; N not a power of two
    (2, 11, 13, 4, 5, 4),     # small blocks: 3 channel blocks and 3 chunks per program
])
def test_kernel_matches_reference_across_blocks_and_chunks(b, d, l, n, chunk, block_d):
    x = make_inputs(b, d, l, n, seed=b + d + l)
    check_against_reference(x, True, FP32_TOL, chunk=chunk, block_d=block_d)


def test_selective_scan_dispatches_to_the_kernel():
    """On CPU under TRITON_INTERPRET=1 `selective_scan` is the kernel, with or without last state."""
    x = make_inputs(2, 5, 7, 4)
    args = [x[k] for k in NAMES]
    out, last = mt.selective_scan(*args, delta_softplus=True, return_last_state=True)
    k_out, k_last = mt.SelectiveScanFn.apply(*args, True)
    assert torch.equal(out, k_out) and torch.equal(last, k_last)
    assert torch.equal(mt.selective_scan(*args, delta_softplus=True), k_out)
    assert isinstance(out.grad_fn, type(k_out.grad_fn))


def test_kernel_gradcheck_float64():
    """gradcheck of the kernel's backward against finite differences of its own forward.

    The kernels load float64 but compute in fp32, so finite differences carry fp32 rounding of
    about 1e-7 / eps: with eps = 1e-3 that is 1e-4, far below the O(1) error of a wrong formula.
    Two channel blocks and three chunks exercise every carry of the backward.
    """
    x = make_inputs(1, 3, 5, 2, dtype=torch.float64)
    args = [x[k].detach().double().requires_grad_() for k in NAMES]
    fn = lambda *a: mt.SelectiveScanFn.apply(*a, True, 2, 2)  # noqa: E731
    assert torch.autograd.gradcheck(fn, args, eps=1e-3, atol=2e-3, rtol=1e-2)


def test_backward_saves_checkpoints_not_the_state_history():
    """Everything saved for backward is smaller than the (b, d, l, n) history of states."""
    b, d, l, n = 1, 4, 16, 4
    x = make_inputs(b, d, l, n)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        mt.SelectiveScanFn.apply(*(x[k] for k in NAMES), True, 8)
    assert saved and max(saved) < b * d * l * n


def test_kernel_reads_strided_views_in_place():
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
    check_against_reference(x, True, FP32_TOL)


def test_mamba_block_kernel_matches_reference(monkeypatch):
    """The block through the kernel equals the block through the reference, output and weights' grads."""
    torch.manual_seed(0)
    block = mt.Mamba(24, d_state=4)                                   # 48 channels: two blocks
    x = torch.randn(2, 11, 24)

    def outputs_and_grads():
        block.zero_grad()
        y = block(x)
        (y * torch.linspace(-1, 1, 24)).sum().backward()
        return y, {k: p.grad.clone() for k, p in block.named_parameters()}

    y, grads = outputs_and_grads()
    monkeypatch.setattr(mt, "selective_scan", mt.selective_scan_ref)
    ref_y, ref_grads = outputs_and_grads()
    torch.testing.assert_close(y, ref_y, **FP32_TOL["out"])
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], **FP32_TOL["grad"], msg=name)


# ------------------------------------------------------------------------------------------------
# The CPU scan (hand-written adjoint) against the reference


def check_cpu_scan(x, softplus, tol):
    cpu = lambda *args: mt.selective_scan_cpu(*args, return_last_state=True)  # noqa: E731
    out, last, grads = run(cpu, x, softplus)
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
def test_cpu_scan_matches_reference_per_optional_input(option, dtype):
    x = make_inputs(2, 5, 7, 4, dtype, use=("u", "delta", "A", "B", "C") + OPTIONS[option])
    check_cpu_scan(x, option in ("softplus", "all"), FP32_TOL if dtype == torch.float32 else BF16_TOL)


@pytest.mark.parametrize("b, d, l, n", [(1, 3, 1, 2), (2, 12, 19, 3), (3, 4, 40, 16)])
def test_cpu_scan_matches_reference_odd_shapes(b, d, l, n):
    """One step (no recurrence), N not a power of two, and a longer sequence."""
    check_cpu_scan(make_inputs(b, d, l, n, seed=l), True, FP32_TOL)


def test_cpu_scan_reads_strided_views_and_runs_under_autocast():
    """The block's time-major views, and bf16 autocast (as training on a CPU runs it): the scan
    keeps fp32 inside, so its output under autocast equals its output without."""
    b, d, l, n = 2, 6, 9, 4
    g = torch.Generator().manual_seed(3)
    x = make_inputs(b, d, l, n)
    x["u"] = torch.randn(b, l, d, generator=g).transpose(1, 2).requires_grad_()
    x["B"] = torch.randn(b, l, n, generator=g).transpose(1, 2).requires_grad_()
    check_cpu_scan(x, True, FP32_TOL)
    args = [x[k] for k in NAMES]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = mt.selective_scan_cpu(*args, delta_softplus=True)
    assert torch.equal(auto, mt.selective_scan_cpu(*args, delta_softplus=True))


def test_cpu_scan_gradcheck_float64():
    """gradcheck of the adjoint by finite differences: the CPU scan computes in fp32 (as the
    kernels do), so the tolerances are those of the kernel's gradcheck."""
    x = make_inputs(1, 3, 5, 2, dtype=torch.float64)
    args = [x[k].detach().double().requires_grad_() for k in NAMES]
    fn = lambda *a: mt.selective_scan_cpu(*a, delta_softplus=True, return_last_state=True)  # noqa: E731
    assert torch.autograd.gradcheck(fn, args, eps=1e-3, atol=2e-3, rtol=1e-2)


def test_selective_scan_dispatches_to_the_cpu_scan_without_the_interpreter(monkeypatch):
    monkeypatch.setattr(mt, "_INTERPRET", False)
    x = make_inputs(2, 5, 7, 4)
    out = mt.selective_scan(*(x[k] for k in NAMES), delta_softplus=True)
    assert type(out.grad_fn).__name__ != "SelectiveScanFnBackward"
    assert torch.equal(out, mt.selective_scan_cpu(*(x[k] for k in NAMES), delta_softplus=True))


@pytest.mark.parametrize("capability, dtype, runs", [
    ((6, 1), torch.float32, False), ((7, 0), torch.float32, False),   # below Triton's 7.5
    ((7, 5), torch.float32, True), ((7, 5), torch.float16, True),     # T4: fp32 (fp16 as fp32)
    ((7, 5), torch.bfloat16, False), ((8, 0), torch.bfloat16, True), ((9, 0), torch.bfloat16, True)])
def test_kernels_run_only_on_cards_that_take_them(monkeypatch, capsys, capability, dtype, runs):
    """The dispatch on a CUDA tensor, with the card's compute capability monkeypatched: the
    kernels where they run, else the PyTorch scan with a one-line notice, printed once."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(mt, "_NOTICES", set())
    u = types.SimpleNamespace(is_cuda=True, device=torch.device("cuda", 0), dtype=dtype)  # a CUDA tensor's face
    assert (mt.kernel_refusal(u.device, dtype) == "") == runs
    assert mt.kernels_run(u) == runs and mt.kernels_run(u) == runs
    notice = capsys.readouterr().err
    if runs:
        assert notice == ""
    else:
        assert notice.count("\n") == 1 and notice.startswith("mamba_triton: ")
        assert "runs in PyTorch (selective_scan_cpu)" in notice and f"{capability[0]}.{capability[1]}" in notice


def test_fp16_inputs_run_the_fp32_kernels():
    """--amp fp16 hands the scan fp16 inputs: the kernels take them as fp32 (interpreter here), and
    the output and every gradient, back in fp16, match the kernel on the same numbers in fp32 to
    fp16's rounding (rtol 2e-3, atol 2e-3)."""
    half = make_inputs(2, 5, 7, 4, dtype=torch.float16)
    full = {k: v.detach().float().requires_grad_() for k, v in half.items()}
    results = []
    for x in (half, full):
        out, last = mt.selective_scan(*(x[k] for k in NAMES), delta_softplus=True, return_last_state=True)
        assert type(out.grad_fn).__name__ != "_ScanCPUBackward" and out.dtype == x["u"].dtype
        results.append([out, *torch.autograd.grad(out.float().sum() + last.sum(), [x[k] for k in NAMES])])
    for got, want in zip(*results):
        torch.testing.assert_close(got.float(), want.to(got.dtype).float(), rtol=2e-3, atol=2e-3)
