"""How a training step runs on the machine at hand: bf16 where the hardware multiplies it, fp16
with a loss scale on GPUs without bf16, the attention kernel on a CPU, cheaper CPU substitutes for
dropout and BDAM's attention (install_cpu_substitutes), malloc's treatment of large blocks, and
activation checkpointing where memory is short. None changes the model's arithmetic;
`python -m tools.train_bench` measures what they buy and what the step holds in memory
(docs/benchmarks.md#cpu-training-step).

Tests: pytest tests/test_devices.py
"""
import contextlib
import ctypes
import functools
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint

from model import Attention


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX; Linux's /proc/cpuinfo). Without
    it, bf16 autocast on a CPU emulates the products and is slower than fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def keep_freed_memory() -> None:
    """Ask glibc's malloc to keep freed memory for reuse rather than hand it back to the system:
    by default every block over 128 KiB and up to 32 MiB (the fusion's states are 16 MiB) is
    mapped afresh and unmapped when freed, so each step first-touches its large tensors again,
    page by page. A no-op where the C library is not glibc. Costs the memory of the largest
    step, held until exit."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(-3, 2 ** 30)  # M_MMAP_THRESHOLD: blocks below 1 GiB come from the heap
    libc.mallopt(-1, 2 ** 30)  # M_TRIM_THRESHOLD: keep up to 1 GiB of freed heap


AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}  # TrainConfig.amp


def amp_mode(value) -> str:
    """TrainConfig.amp as bf16 | fp16 | off; true / false (the flag and config.json of runs from
    before fp16 existed) read as bf16 / off. ValueError for anything else."""
    old = {"true": "bf16", "1": "bf16", "yes": "bf16", "false": "off", "0": "off", "no": "off"}
    mode = old.get(str(value).lower(), str(value).lower())
    if mode not in AMP_DTYPES:
        raise ValueError(f"amp must be bf16, fp16 or off (true/false: bf16/off), got {value!r}")
    return mode


def grad_scaler(device: torch.device, amp) -> torch.amp.GradScaler | None:
    """fp16 autocast on a GPU needs its loss scaled (fp16's smallest normal number is 6e-5: small
    gradients flush to zero): a GradScaler, which train.update applies and losses.GradNorm takes
    into account. None for bf16 (fp32's exponent range), off, or a CPU (fp16 runs as fp32 there)."""
    return torch.amp.GradScaler(device.type) if amp_mode(amp) == "fp16" and device.type == "cuda" else None


def optimizer_step(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None) -> None:
    """optimizer.step(); with a GradScaler, its step (.grad unscaled first; an inf or nan skips the
    step) and its update (the scale lowered after a skip, raised after a run of good steps)."""
    if scaler is None:
        optimizer.step()
    else:
        scaler.step(optimizer)
        scaler.update()


def forward_context(device: torch.device, amp) -> contextlib.ExitStack:
    """How a training forward runs: autocast to `amp` (bf16 | fp16 | off, amp_mode) where the
    device multiplies it: fp16 and bf16 on a GPU, bf16 on a CPU with cpu_has_bf16() (elsewhere a
    CPU runs fp32); on a CPU, attention by its plain matrix products (SDPA's math kernel), as
    PyTorch's fused CPU attention kernel is slow at these lengths. The attention is the same
    arithmetic either way; bf16 rounds the products as a GPU run does (the losses, the GradNorm
    weights and the scan stay fp32). The backward follows the forward's choices."""
    stack = contextlib.ExitStack()
    dtype = AMP_DTYPES[amp_mode(amp)]
    on = dtype is not None and (device.type == "cuda" or (device.type == "cpu" and dtype is torch.bfloat16
                                                          and cpu_has_bf16()))
    stack.enter_context(torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=on))
    if device.type == "cpu":
        stack.enter_context(sdpa_kernel(SDPBackend.MATH))
    return stack


def cpu_dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """F.dropout(x, p, training) with a cheaper mask on a CPU tensor: torch's bernoulli_ draws a
    number of the Mersenne Twister per element; here each 64-bit draw gives four 16-bit numbers,
    and an element is kept when its number is at least p * 65536 (rounded). The same
    Bernoulli(1 - p) mask and 1 / (1 - p) scale, p to within 1 / 65536, at half the cost forward
    and backward. On a GPU, F.dropout itself (its random numbers are cheap there)."""
    if not training or p == 0 or x.device.type != "cpu":
        return F.dropout(x, p, training)
    n = x.numel()
    draws = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-2 ** 63, None)  # every bit
    numbers = draws.view(torch.int16)[:n].view(x.shape)             # uniform in -2^15 .. 2^15-1
    threshold = -2 ** 15 + round(p * 2 ** 16)
    scale = torch.where(numbers >= threshold, 1 / (1 - p), 0.0).to(x.dtype)
    return x * scale


class Dropout(nn.Dropout):
    """nn.Dropout with cpu_dropout's mask (install_cpu_substitutes puts it in the model)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.inplace:
            return super().forward(x)
        return cpu_dropout(x, self.p, self.training)


class CPUAttention(Attention):
    """model.Attention with nn.MultiheadAttention's product written out over its own weights, so
    that the dropout on the attention weights is cpu_dropout: the same outputs in eval mode."""

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, P, D), context (B, P', D) or None -> (B, P, D)."""
        a, q = self.attn, self.norm(x)
        kv = q if self.norm_context is None else self.norm_context(context)
        (w_q, w_kv), (b_q, b_kv) = (t.split([a.embed_dim, 2 * a.embed_dim]) for t in (a.in_proj_weight, a.in_proj_bias))
        heads = lambda t: t.unflatten(-1, (a.num_heads, a.head_dim)).transpose(1, 2)  # noqa: E731  (B, H, P, d)
        k, v = map(heads, F.linear(kv, w_kv, b_kv).chunk(2, dim=-1))
        scores = heads(F.linear(q, w_q, b_q)) @ k.transpose(-1, -2) / math.sqrt(a.head_dim)  # (B, H, P, P')
        out = cpu_dropout(scores.softmax(-1), a.dropout, self.training) @ v               # (B, H, P, d)
        return x + a.out_proj(out.transpose(1, 2).flatten(2))


def install_cpu_substitutes(model: nn.Module, device: torch.device) -> None:
    """On a CPU, cheaper random numbers in the paper's own modules of a model.T2IReID (BDAM and
    the fusion; the pretrained encoders keep theirs): each nn.Dropout there becomes a Dropout,
    each model.Attention a CPUAttention. Same parameters, state-dict names and eval outputs, and
    the random draws in the order the model makes them. A no-op on a GPU."""
    if torch.device(device).type != "cpu":
        return
    parts = [part for part in (model.bdam, model.fusion) if part is not None]
    for module in [m for part in parts for m in part.modules()]:
        if type(module) is Attention:
            module.__class__ = CPUAttention
        for name, child in module.named_children():
            if type(child) is nn.Dropout:
                setattr(module, name, Dropout(child.p))


def text_attention_for(text_encoder: nn.Module, device: torch.device) -> None:
    """On a CPU, the Hugging Face text encoder computes its attention by its own "eager" path
    (matmul, additive padding mask, softmax, matmul) rather than through PyTorch's SDPA, whose
    math kernel also checks every masked row for full masking. The same product either way. On
    a GPU the fused SDPA kernels stay."""
    if device.type == "cpu":
        text_encoder.config._attn_implementation = "eager"


def checkpoint_activations(model: nn.Module) -> None:
    """Activation checkpointing (TrainConfig.grad_checkpoint) of a model.T2IReID: every layer of
    the ViT, of the text encoder and of BDAM keeps only its inputs for the backward, which runs
    the layer's forward again (torch.utils.checkpoint, use_reentrant=False; the RNG state is
    restored, so dropout draws the same mask). The Hugging Face encoders by their own switch, on
    their layers' forward: the trainable text layers that model.text_features runs itself above
    frozen ones (encoders.run_bert_layers) are covered too. BDAM's layers by wrapping their
    forward. Costs about one more forward of these layers per step; what it saves:
    `python -m tools.train_bench --memory`."""
    kwargs = {"use_reentrant": False}
    for encoder in (model.vision, model.text):
        encoder.config.use_cache = False  # a key-value cache is for generation, and checkpointing refuses it
        if hasattr(encoder, "activation_checkpointing_enable"):  # its name since transformers 5.x
            encoder.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    for layer in model.bdam.layers if model.bdam is not None else ():
        layer.forward = functools.partial(_recomputed, layer.forward)


def _recomputed(forward, *args):
    """forward(*args) with its activations recomputed in the backward, when one will run."""
    if torch.is_grad_enabled() and forward.__self__.training:
        return checkpoint(forward, *args, use_reentrant=False)
    return forward(*args)


def not_float32(model: torch.nn.Module) -> str:
    """"; the model holds float16 parameters (N tensors): names" for the error of a non-finite
    loss, or "": Adam on half-precision weights overflows (helpers/encoders.py loads float32)."""
    held = {}
    for name, p in model.named_parameters():
        if p.requires_grad and p.dtype != torch.float32:
            held.setdefault(str(p.dtype).removeprefix("torch."), []).append(name)
    return "".join(f"; the model holds {dtype} parameters ({len(names)} tensors): {', '.join(names[:4])}"
                   + ", ..." * (len(names) > 4) for dtype, names in held.items())
