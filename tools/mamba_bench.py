"""The selective scan and the Mamba block timed on a GPU: `python -m tools.mamba_bench`.

Three tables, measured in one run beside the device's copy bandwidth: the Triton scan (forward,
and forward + backward) against the PyTorch reference at L 197 to 16,384 in fp32 and bf16, with
the share of the copy bandwidth that its least DRAM traffic reaches; the sequential kernels
against the chunked ones (tools/mamba_chunked.py) at batch 1 to 64, with the one that
mamba_chunked.chunked_is_faster picks; and one Mamba block against one Transformer encoder layer
of the same width. The scans themselves are mamba_triton.py and tools/mamba_chunked.py; their checks
against the reference are `python mamba_triton.py` and tests/test_mamba_chunked.py, their
compilation for sm_80 / sm_90 without a GPU `python -m tools.mamba_compile`.
"""
import sys

import torch
import triton
from torch import nn

from tools import mamba_chunked
from helpers.scan_check import random_inputs
from mamba_triton import BLOCK_D, CHUNK, Mamba, selective_scan, selective_scan_ref


def _scan_bytes(b, d, l, n, elem, backward):
    """Least DRAM traffic of one pass: each (b, d, l) and (b, n, l) tensor read or written once."""
    checkpoints = 4 * b * d * n * triton.cdiv(l, CHUNK)
    if not backward:                 # read u, delta, z, B, C; write out, checkpoints
        return elem * (4 * b * d * l + 2 * b * n * l) + checkpoints
    partials = 2 * 4 * b * triton.cdiv(d, BLOCK_D) * l * n   # dB, dC partial sums, fp32
    # read u, delta, z, dout, B, C, checkpoints; write du, ddelta, dz and the partials
    return elem * (7 * b * d * l + 2 * b * n * l) + checkpoints + partials


def _bench_scan(do_bench, copy_gbs):
    """Forward and forward+backward of the Triton scan against the reference (up to L = 1024)."""
    b, d, n = 64, 512, 16
    print(f"\nselective scan, batch {b}, channels {d}, N {n}, every optional input; median ms of "
          f"triton.testing.do_bench.\n'% copy': least traffic / time, as a share of the copy "
          f"bandwidth. The reference (a Python loop over L) is timed up to L = 1024 only.")
    print(f"{'L':>6s} {'dtype':>8s} | {'fwd':>8s} {'% copy':>7s} {'ref fwd':>8s} {'speedup':>8s} | "
          f"{'fwd+bwd':>8s} {'% copy':>7s} {'ref f+b':>8s} {'speedup':>8s}")
    for l in (197, 1024, 4096, 16384):
        for dtype in (torch.float32, torch.bfloat16):
            x = random_inputs(b, d, l, n, dtype, "cuda")
            leaves = list(x.values())
            dout = torch.randn_like(x["u"])
            row = []
            for fn in (selective_scan, selective_scan_ref):
                if fn is selective_scan_ref and l > 1024:
                    row += [None, None]
                    continue
                with torch.no_grad():
                    fwd = do_bench(lambda: fn(*leaves, True), return_mode="median")
                both = do_bench(lambda: fn(*leaves, True).backward(dout), grad_to_none=leaves,
                                return_mode="median")
                row += [fwd, both]
            elem = x["u"].element_size()
            floor = [_scan_bytes(b, d, l, n, elem, False) / copy_gbs / 1e6,
                     (_scan_bytes(b, d, l, n, elem, False) + _scan_bytes(b, d, l, n, elem, True))
                     / copy_gbs / 1e6]
            cells = []
            for mine, floor_ms, ref in ((row[0], floor[0], row[2]), (row[1], floor[1], row[3])):
                cells.append(f"{mine:8.3f} {100 * floor_ms / mine:6.0f}% " + (
                    f"{ref:8.2f} {ref / mine:7.0f}x" if ref is not None else f"{'-':>8s} {'-':>8s}"))
            print(f"{l:6d} {str(dtype)[6:]:>8s} | " + " | ".join(cells))
            del x, leaves, dout


def _bench_chunked(do_bench):
    """Sequential against chunked kernels, forward and forward+backward, and the rule's pick."""
    d, n = 512, 16
    print(f"\nsequential (mamba_triton) against chunked (mamba_chunked) scan, channels {d}, N {n}, "
          f"bf16, every optional input; median ms of triton.testing.do_bench.\n'rule': the scan "
          f"that mamba_chunked.chunked_is_faster picks; 'ratio': sequential / chunked.")
    print(f"{'batch':>5s} {'L':>6s} | {'seq fwd':>8s} {'chk fwd':>8s} {'ratio':>6s} | "
          f"{'seq f+b':>8s} {'chk f+b':>8s} {'ratio':>6s} | rule")
    for batch in (1, 8, 32, 64):
        for l in (197, 1024, 4096, 16384):
            x = random_inputs(batch, d, l, n, torch.bfloat16, "cuda")
            leaves = list(x.values())
            dout = torch.randn_like(x["u"])
            times = []
            for backward in (False, True):
                for chunked in (False, True):
                    def step(chunked=chunked, backward=backward):
                        with torch.set_grad_enabled(backward):
                            out = mamba_chunked.selective_scan(*leaves, True, chunked=chunked)
                        if backward:
                            out.backward(dout)
                    times.append(do_bench(step, grad_to_none=leaves, return_mode="median"))
            rule = "chunked" if mamba_chunked.chunked_is_faster(batch, d, l) else "sequential"
            fwd, both = (f"{seq:8.3f} {chk:8.3f} {seq / chk:6.2f}"
                         for seq, chk in (times[:2], times[2:]))
            print(f"{batch:5d} {l:6d} | {fwd} | {both} | {rule}")
            del x, leaves, dout


def _bench_blocks(do_bench, batch=8):
    """One Mamba block against one Transformer encoder layer (SDPA attention), bf16 autocast."""
    mamba = Mamba(256).cuda()
    attention = nn.TransformerEncoderLayer(256, nhead=8, dim_feedforward=1024, dropout=0.0,
                                           batch_first=True).cuda()
    print(f"\nMamba block ({sum(p.numel() for p in mamba.parameters()):,} params) vs "
          f"TransformerEncoderLayer ({sum(p.numel() for p in attention.parameters()):,} params),"
          f"\nd_model 256, batch {batch}, bf16 autocast; median ms of forward, forward+backward")
    print(f"{'L':>6s} {'mamba fwd':>10s} {'attn fwd':>10s} {'mamba f+b':>10s} {'attn f+b':>10s}")
    for l in (197, 1024, 4096, 16384):
        x = torch.randn(batch, l, 256, device="cuda", requires_grad=True)
        times = []
        for backward in (False, True):
            for module in (mamba, attention):
                def step(module=module, backward=backward):
                    with torch.autocast("cuda", torch.bfloat16), torch.set_grad_enabled(backward):
                        y = module(x)
                    if backward:
                        y.float().sum().backward()
                times.append(do_bench(step, grad_to_none=[x, *module.parameters()],
                                      return_mode="median"))
        print(f"{l:6d} " + " ".join(f"{t:10.3f}" for t in times))


def bench():
    """Copy bandwidth, then the scan and the blocks, all measured in this run."""
    if not torch.cuda.is_available():
        raise SystemExit("tools/mamba_bench.py needs a CUDA GPU and found none. "
                         "Run `python mamba_triton.py` for the check against the reference.")
    from triton.testing import do_bench
    src = torch.empty(2 ** 28, device="cuda")                        # 1 GiB
    dst = torch.empty_like(src)
    copy_gbs = 2 * src.numel() * 4 / do_bench(lambda: dst.copy_(src), return_mode="median") / 1e6
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"triton {triton.__version__}; device-to-device copy: {copy_gbs:,.0f} GB/s")
    del src, dst
    _bench_scan(do_bench, copy_gbs)
    _bench_chunked(do_bench)
    _bench_blocks(do_bench)


if __name__ == "__main__":
    bench()
    sys.exit(0)
