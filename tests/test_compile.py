"""The Triton kernels compile for real GPUs, checked on a CPU: forward and backward, sequential
(mamba_triton.py) and chunked (tools/mamba_chunked.py, six launches), sm_75, sm_80, sm_86 and sm_90,
fp32 and bf16, with no optional input, each one alone, and all of them.

test_mamba_triton.py checks what the kernels compute, in Triton's interpreter; a kernel that
passes there can still be refused by the GPU backend (an op it lacks, a layout it rejects, more
registers than a thread has). `triton.compile` with a GPUTarget runs the whole pipeline down to
ptxas, which the triton wheel ships, without a GPU. A spill is reported as a warning, not a
failure: the kernel still runs, only slower.

Run: pytest tests/test_compile.py   (384 compilations, about 160 s of one core)
The table: python -m tools.mamba_compile
"""
import itertools
import warnings

import pytest

from tools import mamba_compile as mc

VARIANTS = list(itertools.product(mc.COMPILE_KERNELS, mc.COMPILE_ARCHS, mc.COMPILE_DTYPES,
                                  mc.COMPILE_INPUTS))


@pytest.fixture(scope="module")
def compiled():
    """Every variant, compiled once (in a fresh Python: conftest.py turns the interpreter on)."""
    return {(r["kernel"], r["arch"], r["dtype"], r["inputs"]): r for r in mc.compile_kernels()}


@pytest.mark.parametrize("kernel, arch, dtype, inputs", VARIANTS)
def test_kernel_compiles_for_gpu(compiled, kernel, arch, dtype, inputs):
    row = compiled[kernel, arch, dtype, inputs]
    variant = f"the {kernel} kernel for sm_{arch}, {dtype}, optional inputs '{inputs}'"
    assert row["error"] is None, f"{variant} does not compile:\n{row['error']}"
    assert 0 < row["registers"] <= 255, f"{variant}: {row['registers']} registers per thread"
    if row["spill_stores"] or row["spill_loads"]:
        warnings.warn(f"{variant} SPILLS: {row['spill_stores']} bytes stored to and "
                      f"{row['spill_loads']} bytes loaded from local memory per thread "
                      f"({row['registers']} registers)")


def test_compile_table_names_spills_and_failures(capsys):
    """The table marks a spilling variant and says in words which ones spill or fail."""
    rows = [dict(kernel=k, arch=a, dtype=d, inputs=i, ptxas="12.8", registers=100,
                 spill_stores=0, spill_loads=0, seconds=0.5, error=None)
            for k, a, d, i in VARIANTS]
    rows[VARIANTS.index(("forward", 80, "fp32", "none"))].update(registers=255, spill_stores=64, spill_loads=32)
    rows[VARIANTS.index(("backward", 75, "bf16", "all"))].update(   # a card without bf16 refusing it
        registers=None, spill_stores=None, spill_loads=None, error="PTXASError: ptxas fatal")
    mc.print_compile_table(rows)
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("forward   sm_80  fp32"))
    assert row.split()[3] == "255*"
    row = next(line for line in out.splitlines() if line.startswith("backward  sm_75  bf16"))
    assert row.split()[-1] == "FAILED" and row.split()[3] == "100"
    assert ("SPILLS: forward kernel, sm_80, fp32, inputs none: 64 bytes stored to and 32 bytes "
            "loaded from local memory per thread") in out
    assert ("FAILED to compile: backward kernel, sm_75, bf16, inputs all:\n"
            "PTXASError: ptxas fatal") in out
    assert f"{len(rows) - 1} of {len(rows)} variants compiled" in out and "; 1 spill." in out
