"""Tests for mamba_triton.py: the reference against hand-worked values, and the Mamba block.

Run: pytest tests/test_mamba_triton.py   (conftest.py switches Triton to its CPU interpreter)
"""
import math

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
