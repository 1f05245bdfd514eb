"""How a training step runs on the machine at hand: bf16 where the hardware multiplies it, the
attention kernel on a CPU, dropout's random numbers on a CPU, and malloc's treatment of large
blocks. None changes the model; `python train_bench.py` measures what they buy
(docs/benchmarks.md).
"""
import contextlib
import ctypes
from pathlib import Path

import torch
from torch import nn
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


class Dropout(nn.Dropout):
    """nn.Dropout whose mask costs less on a CPU: torch's bernoulli_ draws a number of the
    Mersenne Twister per element, 5 ms for BDAM's (32, 32, 768) FFN activations on two cores,
    80x the product it masks. Here each 64-bit draw gives four 16-bit numbers, and an element is
    kept when its number is at least p * 65536 (rounded): the same Bernoulli(1 - p) mask and
    1 / (1 - p) scale, p to within 1 / 65536, at half the cost forward and backward. On a GPU,
    nn.Dropout itself (its random numbers are cheap there)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0 or x.device.type != "cpu" or self.inplace:
            return super().forward(x)
        n = x.numel()
        draws = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-2 ** 63, None)  # every bit
        numbers = draws.view(torch.int16)[:n].view(x.shape)             # uniform in -2^15 .. 2^15-1
        threshold = -2 ** 15 + round(self.p * 2 ** 16)
        scale = torch.where(numbers >= threshold, 1 / (1 - self.p), 0.0).to(x.dtype)
        return x * scale


def text_attention_for(text_encoder: nn.Module, device: torch.device) -> None:
    """On a CPU, the Hugging Face text encoder computes its attention by its own "eager" path
    (matmul, additive padding mask, softmax, matmul) rather than through PyTorch's SDPA: with a
    mask, the math kernel that forward_context picks there also checks every row for full
    masking and selects, 0.9x the text layer's time without that (`python train_bench.py`).
    The same product either way. On a GPU the fused SDPA kernels stay."""
    if device.type == "cpu":
        text_encoder.config._attn_implementation = "eager"
