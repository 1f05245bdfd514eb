"""How a training step runs on the machine at hand: bf16 where the hardware multiplies it, the
attention kernel on a CPU, and malloc's treatment of large blocks. None changes the model;
`python train.py --bench` measures what they buy (docs/benchmarks.md).
"""
import contextlib
import ctypes
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX; Linux's /proc/cpuinfo). Without
    it, bf16 autocast on a CPU emulates the products and is slower than fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def keep_freed_memory() -> None:
    """Ask glibc's malloc to keep freed memory for reuse rather than hand it back to the system.
    By default every block over 128 KiB and up to 32 MiB (the fusion's states are 16 MiB) is
    mapped afresh from the system and unmapped when freed, so each step first-touches its large
    tensors again, page by page: on two cores that took 60% of the scan's time. A no-op where
    the C library is not glibc. Costs the memory of the largest step, held until exit."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(-3, 2 ** 30)  # M_MMAP_THRESHOLD: blocks below 1 GiB come from the heap
    libc.mallopt(-1, 2 ** 30)  # M_TRIM_THRESHOLD: keep up to 1 GiB of freed heap


def forward_context(device: torch.device, amp: bool) -> contextlib.ExitStack:
    """How a training forward runs: bf16 autocast where `amp` and the device multiplies bf16 (a
    GPU, or cpu_has_bf16()); on a CPU, attention by its plain matrix products. PyTorch's fused
    CPU attention kernel is slow at these lengths: on two cores its backward took half of the
    text layer's time (`python train.py --bench`, docs/benchmarks.md). The attention is the same
    arithmetic either way; bf16 rounds the products as a GPU run does (the losses, the GradNorm
    weights and the scan stay fp32). The backward follows the forward's choices."""
    stack = contextlib.ExitStack()
    on = amp and (device.type == "cuda" or (device.type == "cpu" and cpu_has_bf16()))
    stack.enter_context(torch.autocast(device.type, dtype=torch.bfloat16, enabled=on))
    if device.type == "cpu":
        stack.enter_context(sdpa_kernel(SDPBackend.MATH))
    return stack
