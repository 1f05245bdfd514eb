"""The selective-scan kernels of mamba_triton.py and tools/mamba_chunked.py compiled for real GPUs on a
machine without one.

The interpreter cannot tell whether a kernel compiles for a real card (an op the backend lacks,
a layout it rejects, more registers than a thread has). triton.compile with a GPUTarget runs
the whole pipeline down to ptxas (shipped in the triton wheel) on the CPU, and ptxas's log gives
the registers per thread and the bytes spilled to local memory. The launches compiled are the
ones SelectiveScanFn makes (mamba_triton._fwd_launch, _bwd_launch) and ChunkedScanFn makes
(mamba_chunked._fwd_launches, _bwd_launches), not a second copy.

A variant that does not compile (bf16 on sm_75, were Triton to refuse it) is a FAILED cell of
the table, not a crash. At run time helpers/scan_cpu.kernel_refusal decides which cards run them.

Run:  python -m tools.mamba_compile    the table
Test: pytest tests/test_compile.py
"""
import io
import json
import os
import re
import subprocess
import sys
import time
from contextlib import redirect_stdout

import torch
import triton

from tools import mamba_chunked
from mamba_triton import (BLOCK_D, CHUNK, _INTERPRET, _bwd_launch, _fwd_launch, _layout, _scan_bwd_kernel,
                          _scan_fwd_kernel)

COMPILE_ARCHS = (75, 80, 86, 90)  # sm_75 (T4: no bf16), sm_80 (A100), sm_86 (A10, RTX 30xx), sm_90 (H100, H200)
COMPILE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
COMPILE_INPUTS = {"none": (), "D": ("D",), "z": ("z",), "delta_bias": ("delta_bias",),
                  "softplus": ("softplus",), "all": ("D", "z", "delta_bias", "softplus")}
COMPILE_SHAPE = dict(b=64, d=512, l=197, n=16)  # the benchmark's shape (tools/mamba_bench.py)
# The sequential kernels, then the chunked scan's six launches in the order they run: forward
# pass 1, carry, pass 2; backward pass 1, carry in reverse, pass 2 (tools/mamba_chunked.py).
COMPILE_KERNELS = ("forward", "backward", "seg_end", "seg_carry", "seg_out", "seg_adj",
                   "rev_carry", "seg_grad")


def _block_launches(dtype, optional, b, d, l, n):
    """{name in COMPILE_KERNELS: (kernel, args, kwargs)} as SelectiveScanFn and ChunkedScanFn
    launch them from the Mamba block, with the inputs named in `optional` (D, z, delta_bias,
    softplus) and the block's layout: time-major views, z half of in_proj's output, B and C
    slices of x_proj's. On meta tensors (shapes, strides, dtypes, no memory); pointers count as
    16-byte aligned, as the CUDA caching allocator gives them."""
    r = 16                                                            # dt_rank at d_model 256
    def empty(*shape, dtype=dtype):
        return torch.empty(*shape, dtype=dtype, device="meta")
    u, delta = (empty(b, l, d).transpose(1, 2) for _ in range(2))    # (b, d, l) views
    x_dbl = empty(b, l, r + 2 * n)                                    # (b, l, r + 2n)
    B, C = x_dbl[..., r:r + n].transpose(1, 2), x_dbl[..., r + n:].transpose(1, 2)  # (b, n, l)
    A = empty(d, n, dtype=torch.float32)                              # (d, n)
    D = empty(d, dtype=torch.float32) if "D" in optional else None    # (d,)
    z = empty(b, l, 2 * d)[..., d:].transpose(1, 2) if "z" in optional else None  # (b, d, l)
    bias = empty(d, dtype=torch.float32) if "delta_bias" in optional else None     # (d,)
    softplus = "softplus" in optional
    u, delta, z, B, C = _layout(u, delta, z, B, C)
    _, f_args, f_kwargs, (_, ckpt) = _fwd_launch(u, delta, z, A, B, C, D, bias, softplus,
                                                   CHUNK, BLOCK_D)
    _, b_args, b_kwargs, _ = _bwd_launch(u, delta, z, A, B, C, D, bias, ckpt, empty(b, d, l),
                                         empty(b, d, n, dtype=torch.float32), softplus, CHUNK,
                                         BLOCK_D)
    c_fwd, (_, c_ckpt, dtsum), seg_chunks = mamba_chunked._fwd_launches(
        u, delta, z, A, B, C, D, bias, softplus, CHUNK, BLOCK_D, None)
    c_bwd, _ = mamba_chunked._bwd_launches(u, delta, z, A, B, C, D, bias, c_ckpt, dtsum,
                                           seg_chunks, empty(b, d, l),
                                           empty(b, d, n, dtype=torch.float32), softplus, CHUNK,
                                           BLOCK_D)
    chunked = {name: (kernel, args, kwargs)
               for name, (kernel, _, args, kwargs) in zip(COMPILE_KERNELS[2:], c_fwd + c_bwd)}
    return {"forward": (_scan_fwd_kernel, f_args, f_kwargs),
            "backward": (_scan_bwd_kernel, b_args, b_kwargs), **chunked}


def _compile(kernel, args, kwargs, arch):
    """Compile one launch for sm_<arch>; returns (registers, spill store bytes, spill load bytes).

    The signature, constexprs and alignment hints come from the JIT's own binder, as
    kernel[grid](*args, **kwargs) makes them (create_function_from_signature and _pack_args:
    internal, and the same in Triton 3.6 through 3.9). The cache is bypassed so that ptxas runs
    and its log (`-v`), which Triton prints on request, can be read."""
    from triton.compiler import ASTSource, make_backend
    from triton.backends.compiler import GPUTarget
    from triton.runtime.jit import create_function_from_signature
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    bound, specialization, options = create_function_from_signature(
        kernel.signature, kernel.params, backend)(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound,
                                                              specialization, options)
    log = io.StringIO()
    with triton.knobs.nvidia.scope(), triton.knobs.compilation.scope(), redirect_stdout(log):
        triton.knobs.nvidia.dump_ptxas_log = True
        triton.knobs.compilation.always_compile = True
        triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target,
                       options=options.__dict__)
    regs = re.search(r"Used (\d+) registers", log.getvalue())
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log.getvalue())
    if not (regs and spills):
        raise RuntimeError(f"no register count in ptxas's log:\n{log.getvalue()}")
    return int(regs[1]), int(spills[1]), int(spills[2])


def compile_kernels():
    """Compile forward and backward for every arch, dtype and set of optional inputs above.

    Returns one dict per variant: kernel, arch, dtype, inputs, ptxas (its release), registers,
    spill_stores, spill_loads (bytes), seconds, and error (None, or why it did not compile). Under
    TRITON_INTERPRET=1 the kernels are interpreter objects that cannot be compiled, so the work
    runs in a fresh Python without it."""
    if _INTERPRET:
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        code = "import json; from tools import mamba_compile; print(json.dumps(mamba_compile.compile_kernels()))"
        run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                             text=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        if run.returncode != 0:
            raise RuntimeError(f"compile_kernels in a subprocess failed:\n{run.stderr}")
        return json.loads(run.stdout.splitlines()[-1])
    from triton.backends.nvidia.compiler import get_ptxas        # the ptxas Triton runs per arch
    try:
        ptxas = {arch: get_ptxas(arch).version for arch in COMPILE_ARCHS}
    except RuntimeError as err:
        raise RuntimeError(f"{err}: the triton wheel ships it in triton/backends/nvidia/bin; "
                           f"TRITON_PTXAS_PATH names another") from err
    rows = []
    for dtype_name, dtype in COMPILE_DTYPES.items():
        for inputs, optional in COMPILE_INPUTS.items():
            launches = _block_launches(dtype, optional, **COMPILE_SHAPE)
            for arch in COMPILE_ARCHS:
                for name, (kernel, args, kwargs) in launches.items():
                    row = dict(kernel=name, arch=arch, dtype=dtype_name, inputs=inputs,
                               ptxas=ptxas[arch], registers=None, spill_stores=None,
                               spill_loads=None, error=None)
                    start = time.perf_counter()
                    try:
                        row["registers"], row["spill_stores"], row["spill_loads"] = _compile(
                            kernel, args, kwargs, arch)
                    except Exception as err:  # any failure to compile is the finding to report
                        row["error"] = f"{type(err).__name__}: {err}"
                    row["seconds"] = round(time.perf_counter() - start, 2)
                    rows.append(row)
    return rows


def print_compile_table(rows):
    """The table of `python -m tools.mamba_compile`: registers per thread of every variant, a *
    where it spills; then, in words, every variant that spills or failed to compile."""
    cell = {(r["kernel"], r["arch"], r["dtype"], r["inputs"]): r for r in rows}
    ptxas = ", ".join(f"{version} for sm_{arch}"
                      for arch, version in {r["arch"]: r["ptxas"] for r in rows}.items())
    print(f"Triton {triton.__version__}, ptxas {ptxas}.\nThe kernels as the Mamba block launches "
          f"them: batch {COMPILE_SHAPE['b']}, channels {COMPILE_SHAPE['d']}, L "
          f"{COMPILE_SHAPE['l']}, N {COMPILE_SHAPE['n']}.\nRegisters per thread (of 255) with no "
          f"optional input, each one alone, and all; * spills to local memory.\nseg_* and "
          f"rev_carry: the chunked scan's launches (tools/mamba_chunked.py), in the order they run.")
    print(f"{'kernel':9s} {'target':6s} {'dtype':5s}"
          + "".join(f"{inputs:>11s}" for inputs in COMPILE_INPUTS))
    for kernel in COMPILE_KERNELS:
        for arch in COMPILE_ARCHS:
            for dtype in COMPILE_DTYPES:
                line = f"{kernel:9s} sm_{arch:<3d} {dtype:5s}"
                for inputs in COMPILE_INPUTS:
                    r = cell[kernel, arch, dtype, inputs]
                    spills = "*" if r["spill_stores"] or r["spill_loads"] else " "
                    line += f" {'FAILED' if r['error'] else r['registers']:>9}{spills}"
                print(line.rstrip())
    for r in rows:
        variant = f"{r['kernel']} kernel, sm_{r['arch']}, {r['dtype']}, inputs {r['inputs']}"
        if r["error"] is not None:
            print(f"FAILED to compile: {variant}:\n{r['error']}\n")
        elif r["spill_stores"] or r["spill_loads"]:
            print(f"SPILLS: {variant}: {r['spill_stores']} bytes stored to and "
                  f"{r['spill_loads']} bytes loaded from local memory per thread")
    failed = sum(r["error"] is not None for r in rows)
    spill = sum(bool(r["spill_stores"] or r["spill_loads"]) for r in rows)
    print(f"{len(rows) - failed} of {len(rows)} variants compiled in "
          f"{sum(r['seconds'] for r in rows):.0f} s; {spill or 'none'} spill.")


def main() -> int:
    """Print the table; exit status 1 when a variant did not compile."""
    table = compile_kernels()
    print_compile_table(table)
    return 1 if any(r["error"] for r in table) else 0


if __name__ == "__main__":
    sys.exit(main())
