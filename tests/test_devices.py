"""helpers/devices.py: the CPU dropout against nn.Dropout's contract, the CPU attention against
model.Attention, and the model with its CPU substitutes against the plain model.
Run: pytest tests/test_devices.py
"""
import copy

import pytest
import torch
from torch import nn

from helpers import devices
from helpers.devices import CPUAttention, Dropout, amp_mode, install_cpu_substitutes
from model import Attention, ModelConfig, T2IReID


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
def test_cpu_attention_is_the_attention_written_out(cross):
    """CPUAttention computes what model.Attention (nn.MultiheadAttention) computes, with and
    without a context, forward and backward, in eval mode; fp32, tolerances 1e-5 / 1e-4."""
    torch.manual_seed(0)
    plain = Attention(48, 4, dropout=0.1, cross=cross).eval()
    written = copy.deepcopy(plain)
    written.__class__ = CPUAttention
    x, context = torch.randn(3, 7, 48, requires_grad=True), torch.randn(3, 5, 48, requires_grad=True)
    ours, theirs = (layer(x, context if cross else None) for layer in (written, plain))
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    grads = [torch.autograd.grad(out.square().sum(), [x, layer.attn.in_proj_weight])
             for out, layer in ((ours, written), (theirs, plain))]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("layer_class", [Attention, CPUAttention])
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_attention_dropout_keeps_one_minus_p_of_the_attention_weights(layer_class, p):
    """Training mode. With q = k = 0 every attention weight is 1 / P', with v = 1 and the output
    projection the identity the output is x + (kept weights of the row) / (P' (1 - p)) in every
    channel: the kept fraction is 1 - p to within 5 standard deviations (B P P' = 2^18 weights)."""
    b, queries, keys, width = 16, 64, 256, 8
    layer = layer_class(width, 1, dropout=p, cross=True).train()
    with torch.no_grad():
        layer.attn.in_proj_weight.zero_()
        layer.attn.in_proj_bias.copy_(torch.cat([torch.zeros(2 * width), torch.ones(width)]))
        layer.attn.out_proj.weight.copy_(torch.eye(width))
        layer.attn.out_proj.bias.zero_()
        x = torch.randn(b, queries, width)
        kept = (layer(x, torch.randn(b, keys, width)) - x)[..., 0] * (1 - p)  # (B, P) kept fraction per row
    n = b * queries * keys
    assert abs(kept.mean().item() - (1 - p)) < 5 * (p * (1 - p) / n) ** 0.5


def tiny_model(dropout: float) -> T2IReID:
    """A T2IReID with random encoders on 64 x 32 images, BDAM with cross-attention, the fusion."""
    cfg = ModelConfig.small(image_size=(64, 32), vision_layers=1, vision_width=32, vision_heads=2, text_model="",
                            text_layers=1, text_width=32, text_heads=2, bdam_width=32, bdam_heads=2,
                            fusion_width=16, embed_dim=16, dropout=dropout)
    return T2IReID(cfg)


def test_cpu_substitutes_replace_the_paper_modules_dropout_and_attention_only():
    """BDAM's and the fusion's nn.Dropout become devices.Dropout and their Attention CPUAttention;
    the encoders keep theirs; the state dict is the same; a GPU device changes nothing."""
    torch.manual_seed(0)
    model = tiny_model(0.1)
    keys, text_drops = list(model.state_dict()), [m for m in model.text.modules() if type(m) is nn.Dropout]
    install_cpu_substitutes(model, torch.device("cuda"))
    assert not any(isinstance(m, (Dropout, CPUAttention)) for m in model.modules())
    install_cpu_substitutes(model, torch.device("cpu"))
    parts = [*model.bdam.modules(), *model.fusion.modules()]
    assert not any(type(m) in (nn.Dropout, Attention) for m in parts)
    assert sum(isinstance(m, CPUAttention) for m in parts) == 4 * model.cfg.bdam_depth and sum(isinstance(m, Dropout) for m in parts) > 4
    assert text_drops and all(type(m) is nn.Dropout for m in model.text.modules() if isinstance(m, nn.Dropout))
    assert list(model.state_dict()) == keys


def test_cpu_substitutes_keep_the_model_outputs_in_eval_mode():
    """The images' embeddings, tokens and gate, the texts' embeddings and the fusion's pair
    scores of the model with its CPU substitutes equal the plain model's (fp32, 1e-5)."""
    torch.manual_seed(0)
    plain = tiny_model(0.1).eval()
    substituted = copy.deepcopy(plain)
    install_cpu_substitutes(substituted, torch.device("cpu"))
    images, ids = torch.randn(4, 3, 64, 32), torch.randint(1000, 30000, (4, 12))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        outputs = []
        for model in (plain, substituted.eval()):
            img = model.encode_images(images)
            texts = model.text_features(ids, mask)
            outputs.append([img["emb"], img["tokens"], img["gate"], model.text_embedding(texts),
                            model.pair_score(img["tokens"], texts)[0]])
    for got, want in zip(outputs[1], outputs[0]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


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
