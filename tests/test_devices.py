"""helpers/devices.py: the CPU dropout against nn.Dropout's contract, and the attention BDAM writes out
against nn.MultiheadAttention itself.
Run: pytest tests/test_devices.py
"""
import pytest
import torch
from torch import nn

from helpers import devices
from helpers.devices import Dropout, amp_mode
from model import Attention


@pytest.mark.parametrize("p", [0.1, 0.5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dropout_keeps_one_minus_p_and_scales_the_rest(p, dtype):
    """On 2^20 elements the kept fraction is 1 - p to within 5 standard deviations, every kept
    element is x / (1 - p) and every other is 0; the mask differs from call to call."""
    drop = Dropout(p).train()
    x = torch.rand(2 ** 10, 2 ** 10, dtype=dtype) + 1.0                 # no zeros of its own
    torch.manual_seed(0)
    y = drop(x)
    kept = y != 0
    n = x.numel()
    assert abs(kept.float().mean().item() - (1 - p)) < 5 * (p * (1 - p) / n) ** 0.5
    torch.testing.assert_close(y[kept], (x[kept].float() / (1 - p)).to(dtype))
    assert y.dtype == dtype and not torch.equal(kept, drop(x) != 0)


def test_dropout_neighbours_are_independent():
    """The four 16-bit numbers of one 64-bit draw decide four neighbouring elements: each of the
    four positions keeps 1 - p, and pairs of neighbours are kept together (1 - p)^2 of the time."""
    p, x = 0.3, torch.ones(2 ** 20)
    kept = (Dropout(p).train()(x) != 0).float().view(-1, 4)
    tol = 5 * (p * (1 - p) / kept.shape[0]) ** 0.5
    for i in range(4):
        assert abs(kept[:, i].mean().item() - (1 - p)) < tol, i
    both = (kept[:, 0] * kept[:, 1]).mean().item()
    assert abs(both - (1 - p) ** 2) < tol


def test_dropout_backward_is_the_mask_and_eval_is_the_identity():
    drop = Dropout(0.2).train()
    x = torch.randn(64, 48, requires_grad=True)
    y = drop(x)
    y.backward(torch.ones_like(y))
    torch.testing.assert_close(x.grad, (y != 0).float() / 0.8)
    assert torch.equal(drop.eval()(x), x)
    assert torch.equal(Dropout(0.0).train()(x), x)


@pytest.mark.parametrize("cross", [False, True])
def test_attention_is_multihead_attention_written_out(cross):
    """BDAM's Attention computes what nn.MultiheadAttention (its parameter holder) computes, with
    and without a context, forward and backward, dropout off."""
    torch.manual_seed(0)
    layer = Attention(48, 4, dropout=0.1, cross=cross).eval()
    x, context = torch.randn(3, 7, 48, requires_grad=True), torch.randn(3, 5, 48, requires_grad=True)
    ours = layer(x, context if cross else None)
    q = layer.norm(x)
    kv = layer.norm_context(context) if cross else q
    theirs = x + layer.attn(q, kv, kv, need_weights=False)[0]
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    grads = [torch.autograd.grad(out.square().sum(), [x, layer.attn.in_proj_weight]) for out in (ours, theirs)]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert isinstance(layer.attn, nn.MultiheadAttention)  # the state-dict names stay


def test_amp_reads_bf16_fp16_off_and_the_old_true_false():
    assert [amp_mode(v) for v in ("bf16", "FP16", "off", True, False, "true", "false")] == [
        "bf16", "fp16", "off", "bf16", "off", "bf16", "off"]
    with pytest.raises(ValueError, match="amp must be bf16, fp16 or off"):
        amp_mode("fp8")


@pytest.mark.parametrize("amp, has_bf16, dtype", [("bf16", True, torch.bfloat16), ("bf16", False, None),
                                                  ("fp16", True, None), ("off", True, None)])
def test_autocast_on_a_cpu_is_bf16_where_it_multiplies_bf16_and_never_fp16(monkeypatch, amp, has_bf16, dtype):
    monkeypatch.setattr(devices, "cpu_has_bf16", lambda: has_bf16)
    with devices.forward_context(torch.device("cpu"), amp):
        y = nn.Linear(4, 4)(torch.randn(2, 4))
    assert y.dtype == (dtype or torch.float32)
    assert devices.grad_scaler(torch.device("cpu"), amp) is None   # a CPU never runs fp16


def test_optimizer_step_with_a_scaler_is_the_unscaled_step_and_skips_overflow():
    """devices.optimizer_step under a GradScaler (CPU here, scale 1024): the same parameters as a
    plain step on the unscaled loss; an inf gradient skips the step and halves the scale."""
    results = []
    for scaler in (None, torch.amp.GradScaler("cpu", init_scale=1024.0)):
        torch.manual_seed(0)
        layer = nn.Linear(4, 3)
        optimizer = torch.optim.Adam(layer.parameters(), lr=0.1)
        loss = layer(torch.randn(5, 4)).square().mean()
        (scaler.scale(loss) if scaler else loss).backward()
        devices.optimizer_step(optimizer, scaler)
        results.append([p.detach().clone() for p in layer.parameters()])
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    before = [p.detach().clone() for p in layer.parameters()]
    layer.weight.grad = torch.full_like(layer.weight, float("inf"))
    devices.optimizer_step(optimizer, scaler)
    assert all(torch.equal(a, b) for a, b in zip(before, layer.parameters())) and scaler.get_scale() == 512.0
