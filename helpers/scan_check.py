"""The check of a selective scan against the reference, as `python mamba_triton.py` runs it:
random inputs as the Mamba block makes them (every optional input, A < 0, small delta), then the
largest error of the output, the last state and every gradient, at stated tolerances for fp32
and bf16. The letters b, d, l, n are mamba_triton.py's glossary.

Used by mamba_triton.py (its __main__) and tools/mamba_bench.py.
"""
import torch


def random_inputs(b, d, l, n, dtype, device, seed=0):
    """Scan inputs as the Mamba block makes them: every optional input, A < 0, small delta."""
    g = torch.Generator(device).manual_seed(seed)
    x = dict(u=torch.randn(b, d, l, generator=g, device=device),
             delta=0.5 * torch.randn(b, d, l, generator=g, device=device),
             A=-0.5 - torch.rand(d, n, generator=g, device=device),
             B=torch.randn(b, n, l, generator=g, device=device),
             C=torch.randn(b, n, l, generator=g, device=device),
             D=torch.randn(d, generator=g, device=device),
             z=torch.randn(b, d, l, generator=g, device=device),
             delta_bias=0.3 * torch.randn(d, generator=g, device=device))
    return {k: (v if k in ("A", "D", "delta_bias") else v.to(dtype)).requires_grad_()
            for k, v in x.items()}


def check(device, kernel, reference):
    """Print the largest errors of `kernel`'s output and gradients against `reference` (both
    called as selective_scan_ref is); returns whether all of them are within the tolerances."""
    b, d, l, n = (2, 40, 37, 16) if device == "cpu" else (4, 256, 500, 16)
    print(f"kernel vs reference on {device}, batch {b}, channels {d}, L {l}, N {n}, "
          f"every optional input, delta_softplus; relative error = max |error| / max |reference|")
    all_ok = True
    for dtype, (rtol, atol) in ((torch.float32, (2e-3, 6e-3)), (torch.bfloat16, (3e-2, 5e-2))):
        x = random_inputs(b, d, l, n, dtype, device)
        results = []
        for fn in (kernel, lambda *a: reference(*a, return_last_state=True)):
            out, last = fn(*x.values(), True)
            w = torch.randn(out.shape, generator=torch.Generator(device).manual_seed(1),
                            device=device)
            grads = torch.autograd.grad((out.float() * w).sum() + last.sum(), list(x.values()))
            results.append(dict(out=out, last_state=last, **{"d" + k: g for k, g in zip(x, grads)}))
        print(f"\n{str(dtype):16s} {'max abs err':>12s} {'max rel err':>12s}   "
              f"within rtol {rtol}, atol {atol}")
        for name, got in results[0].items():
            want = results[1][name].float()
            err = (got.float() - want).abs()
            ok = bool((err <= atol + rtol * want.abs()).all())
            all_ok &= ok
            rel = (err.max() / want.abs().max()).item()
            print(f"{name:16s} {err.max().item():12.2e} {rel:12.2e}   {'yes' if ok else 'NO'}")
    return all_ok
