"""`python -m tools.train_bench`: where a training step's time goes, part by part, and the whole
step against its two encoders alone (docs/benchmarks.md#cpu-training-step). It takes train.py's
flags and times train.py's State (the model as training builds it, with the CPU substitutes of
devices.install_cpu_substitutes on a CPU) and train_step; train.py does not import it. `--memory`: what a training
step holds in memory, with and without --grad-checkpoint, estimated on the CPU (no GPU needed).

    python -m tools.train_bench                        # SynthPEDES preset on this machine
    python -m tools.train_bench --data synth --device cuda
    python -m tools.train_bench --data cuhk --p 32 --device cuda   # the paper's encoders, batch 128
    python -m tools.train_bench --memory               # the paper's configuration (--data cuhk), batch 32-128

Test: pytest tests/test_train.py -k "bench or memory"
"""
import dataclasses
import functools
import sys
import time
from pathlib import Path
from unittest import mock

import numpy as np
import torch
from transformers.modeling_layers import GradientCheckpointingLayer

import mamba_triton
from losses import compute_losses
from losses import LossConfig
from model import BDAMLayer, ModelConfig, T2IReID
from helpers.devices import checkpoint_activations, cpu_has_bf16, forward_context, keep_freed_memory
from helpers.encoders import EncoderLoadError
from helpers.batches import to_device
from train import Configs, State, parse_config, pick_device, train_step


def bench(cfgs: Configs, steps: int = 10) -> None:
    """Where a training step's time goes: the median time of each part's forward and backward on
    random inputs of the configured shapes, then the whole step (forward, every loss, GradNorm,
    Adam), and the encoders alone as the baseline (ViT + text encoder, the mean of their outputs
    as the loss). Hub encoders are built from their configs with random
    weights (no download). Frozen text layers are timed as training sees them: from the cache
    (filled by the warm-up steps, as train() fills it before the first step)."""
    cfg, loss_cfg, device = cfgs.train, cfgs.loss, pick_device(cfgs.train.device)
    local = lambda name: name if name and Path(name).is_dir() else ""  # noqa: E731
    model_cfg = dataclasses.replace(cfgs.model, vision_model=local(cfgs.model.vision_model),
                                    text_model=local(cfgs.model.text_model))
    b, t = cfg.p * cfg.k, model_cfg.max_text_len
    g = torch.Generator().manual_seed(cfg.seed)
    text = lambda: {"input_ids": torch.randint(1000, 30000, (b, t), generator=g),  # noqa: E731
                    "attention_mask": torch.ones(b, t, dtype=torch.long)}
    batch = to_device({"images": torch.randn(b, 3, *model_cfg.image_size, generator=g),
                       "pids": torch.arange(b) // cfg.k, "identity": text(), "clothing": text()}, device)
    state = State.create(dataclasses.replace(cfgs, model=model_cfg), device, total_steps=10 ** 6)
    model = state.model
    amp = cfg.amp if device.type == "cuda" or (cfg.amp == "bf16" and cpu_has_bf16()) else "off"  # as forward_context
    context = functools.partial(forward_context, device, cfg.amp)  # as train_step runs the forward
    print(f"device {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}), "
          f"batch {b}, images {model_cfg.image_size}, text length {t}, autocast {amp}, "
          f"frozen text layers {model_cfg.text_frozen_layers}")
    print(f"{'part (forward + backward)':40s}{'ms / step':>12s}{'share':>8s}")
    rows = bench_parts(state, batch, loss_cfg, context)
    whole = _median_ms(lambda _: train_step(state, batch), steps, device)
    for name, (setup, timed) in rows.items():
        ms = _median_ms(timed, steps, device, setup)
        print(f"{name:40s}{ms:12.1f}{ms / whole:8.0%}")
    print(f"{'whole training step':40s}{whole:12.1f}{1:8.0%}   ({1000 * b / whole:.1f} images / s)")
    encoders = [model.vision, model.text]
    enc_optimizer = torch.optim.Adam([p for m in encoders for p in m.parameters() if p.requires_grad], lr=cfg.lr)

    def encoders_step(_):
        with context():
            loss = model.vision(pixel_values=batch["images"]).last_hidden_state.float().mean()
            for key in ("identity", "clothing"):
                loss = loss + model.text_features(**batch[key]).float().mean()
        loss.backward()
        enc_optimizer.step()
        enc_optimizer.zero_grad(set_to_none=True)
    base = _median_ms(encoders_step, steps, device)
    print(f"baseline: ViT + text encoder (2 texts) alone {base:.1f} ms; the whole step costs "
          f"{whole / base:.2f}x its encoders")


def bench_parts(state: State, batch: dict, loss_cfg: LossConfig, autocast) -> dict:
    """{part: (setup, timed)}: setup() makes the part's inputs (untimed), timed(inputs) runs the
    part's forward and backward -- or, for the optimiser, its step. autocast() is the context of
    every forward (devices.forward_context)."""
    model = state.model

    def leaf(x):  # an input at which the part's backward stops
        return x.detach().requires_grad_() if torch.is_tensor(x) and x.is_floating_point() else x

    def forward_backward(part):  # part(inputs) -> output tensors; the sum of their means is the loss
        def timed(inputs):
            with autocast():
                outputs = [x for x in part(inputs) if torch.is_tensor(x) and x.requires_grad]
            if outputs:  # frozen text layers alone have nothing to differentiate
                sum(x.float().mean() for x in outputs).backward()
        return timed

    def model_outputs():
        with autocast():
            out = model(batch)
        return out, compute_losses(out, batch, loss_cfg)

    def bdam_inputs():
        with torch.no_grad(), autocast():
            return leaf(model.vision(pixel_values=batch["images"]).last_hidden_state[:, 1:])  # (B, P, Dv)

    def fusion_inputs():
        with torch.no_grad(), autocast():
            out = model(batch)
            tokens = model.image_features(batch["images"])["tokens"]  # (B, P, D)
            texts = model.text_features(**batch["identity"])  # (B, Dt) the identity descriptions
        return leaf(tokens), leaf(out["image_emb"]), texts, leaf(out["identity_emb"])

    def gradnorm_extra(outputs):  # as losses.GradNorm.backward: K - 1 gradients on the shared layer
        for loss in list(outputs[1].values())[:-1]:
            torch.autograd.grad(loss, model.shared_parameter(), retain_graph=True, allow_unused=True)

    def gradients():
        sum(model_outputs()[1].values()).backward()

    def adam(_):
        state.optimizer.step()
        state.optimizer.zero_grad(set_to_none=True)

    texts = [key for key in ("identity", "clothing") if key != "clothing" or loss_cfg.loss_aln]
    rows = {"vision encoder (ViT)": (lambda: None, forward_backward(
                lambda _: [model.vision(pixel_values=batch["images"]).last_hidden_state])),
            f"text encoder ({len(texts)} texts)": (lambda: None, forward_backward(
                lambda _: [model.text_features(**batch[key]) for key in texts]))}
    if model.bdam is not None:
        rows["BDAM"] = (bdam_inputs, forward_backward(lambda patches: model.bdam(patches).values()))
    if model.fusion is not None:
        rows["fusion (S x Q image-text pairs)"] = (fusion_inputs, forward_backward(
            lambda x: [model.fusion_pairs(x[0], x[1], batch["pids"], x[2], x[3])["fusion_scores"]]))
    rows["losses (compute_losses)"] = (lambda: {k: leaf(v) for k, v in model_outputs()[0].items()},
                                       forward_backward(lambda out: compute_losses(out, batch, loss_cfg).values()))
    if loss_cfg.use_gradnorm:
        rows["GradNorm's K - 1 extra gradients"] = (model_outputs, gradnorm_extra)
    rows["optimiser (Adam)"] = (gradients, adam)
    return rows


def _median_ms(timed, steps: int, device, setup=lambda: None) -> float:
    """Median wall time of timed(setup()) over `steps` runs (setup untimed), after 2 warm-ups."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    for _ in range(steps + 2):  # warm-up: allocator, kernels compiled on first use, text cache
        inputs = setup()
        sync()
        start = time.perf_counter()
        timed(inputs)
        sync()
        times.append(1000 * (time.perf_counter() - start))
    return float(np.median(times[2:]))


# ----------------------------------------------------------------------------------------------
# Memory: the tensors autograd keeps for the backward, counted on the CPU, scaled to the batch


def saved_for_backward(forward, parameters=(), layers=()) -> list[tuple[int, torch.dtype, int | None]]:
    """Run forward() with gradients on and list what autograd keeps for its backward: (bytes,
    dtype, the index in `layers` of the module whose forward saved it, or None) per storage. A
    storage saved twice, or through two views, counts once; `parameters` do not count (they are
    counted as parameters). Under non-reentrant checkpointing a checkpointed layer saves only its
    inputs (torch.utils.checkpoint saves them outside the layer, where these hooks see them)."""
    skip = {p.untyped_storage().data_ptr() for p in parameters}
    saved, current = {}, [None]

    def pack(t):
        key = t.untyped_storage().data_ptr()
        if key not in skip and key not in saved:
            saved[key] = (t.untyped_storage().nbytes(), t.dtype, current[0])
        return t
    hooks = [h for i, layer in enumerate(layers)
             for h in (layer.register_forward_pre_hook(lambda *_, i=i: current.__setitem__(0, i)),
                       layer.register_forward_hook(lambda *_: current.__setitem__(0, None)))]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            kept = forward()  # noqa: F841  (the graph, and what it saved, live until the count is done)
    finally:
        for hook in hooks:
            hook.remove()
    return list(saved.values())


def step_memory(model_cfg: ModelConfig, loss_cfg: LossConfig, amp: str, checkpointed: bool, batch: int) -> dict:
    """What one training forward of a `batch` keeps for its backward (random weights, random
    inputs, on the CPU, as a GPU runs it: autocast to bf16 for amp bf16, the model without CPU
    substitutes, the scan's saved tensors as the Triton kernels keep them): {"kept": bytes after
    the forward, "by_dtype", "layer": the most one layer saves -- what a checkpointed layer holds
    again while its backward runs}. On the CPU, SDPA with dropout runs its math kernel, which
    keeps BDAM's attention weights; a GPU's fused kernels keep less: an upper bound there."""
    torch.manual_seed(0)
    model = T2IReID(model_cfg).train()
    if checkpointed:
        checkpoint_activations(model)
    layers = [m for m in model.modules() if isinstance(m, (GradientCheckpointingLayer, BDAMLayer))]  # ViT, BERT, BDAM
    text = lambda: {"input_ids": torch.randint(1000, 30000, (batch, model_cfg.max_text_len)),  # noqa: E731
                    "attention_mask": torch.ones(batch, model_cfg.max_text_len, dtype=torch.long)}
    inputs = {"images": torch.randn(batch, 3, *model_cfg.image_size), "pids": torch.arange(batch) // 2,
              "identity": text(), "clothing": text()}

    def forward():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp != "off"), \
                mock.patch.object(mamba_triton, "selective_scan", _KernelSaves.scan):  # as on a GPU
            return compute_losses(model(inputs), inputs, loss_cfg)
    saved = saved_for_backward(forward, list(model.parameters()), layers)
    by_dtype = {}
    for nbytes, dtype, _ in saved:
        by_dtype[dtype] = by_dtype.get(dtype, 0) + nbytes
    per_layer = [sum(n for n, _, where in saved if where == i) for i in range(len(layers))]
    return {"kept": sum(by_dtype.values()), "by_dtype": by_dtype, "layer": max(per_layer, default=0)}


class _KernelSaves(torch.autograd.Function):
    """The selective scan as the Triton kernels keep it for the backward (SelectiveScanFn: the
    inputs and an fp32 state every CHUNK steps), where the CPU scan keeps every state; the output
    is the CPU scan's. For the memory count only: it has no backward."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus):
        b, d, l = u.shape
        ckpt = u.new_empty(b, -(-l // mamba_triton.CHUNK), A.shape[1], d, dtype=torch.float32)
        ctx.save_for_backward(u, delta, z, A, B, C, D, delta_bias, ckpt)
        return mamba_triton.selective_scan_cpu(u, delta, A, B, C, D, z, delta_bias, delta_softplus)

    @staticmethod
    def scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
        return _KernelSaves.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus)


def memory_table(model_cfg: ModelConfig, loss_cfg: LossConfig, batches=(32, 64, 128), measured: int = 4,
                 memories=(24, 80)) -> dict:
    """Print the estimate of a training step's memory at each batch, amp bf16 and off, with and
    without activation checkpointing; returns {(amp, checkpointed): (fixed bytes, bytes per image)}.

    fixed: fp32 weights, gradients and Adam's two moments of the trained parameters (16 bytes
    each), 4 bytes per frozen one. Per image: the saved activations of a batch of `measured`
    (step_memory), divided by it (they grow linearly with the batch: each image brings its texts
    and its 1 + M fusion pairs; only the B x B similarity matrices do not), checkpointed: plus one
    layer's activations, recomputed in its backward. Not counted: the CUDA context and the caching
    allocator's slack (leave 1-2 GB), the gradients in flight during the backward (a few of one
    layer's outputs), the autocast weight copies outside the forward."""
    model = T2IReID(model_cfg)
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    fixed = 16 * trained + 4 * (sum(p.numel() for p in model.parameters()) - trained)
    gib, rows, result = 2 ** 30, {}, {}
    print(f"memory of a training step: images {model_cfg.image_size}, text length {model_cfg.max_text_len}, {trained:,} "
          f"trained parameters: weights + gradients + Adam (fp32) {fixed / gib:.2f} GiB; activations measured "
          f"at batch {measured} on the CPU (torch.autograd.graph.saved_tensors_hooks), scaled linearly")
    for amp in ("bf16", "off"):
        for checkpointed in (False, True):
            m = step_memory(model_cfg, loss_cfg, amp, checkpointed, measured)
            per_image = (m["kept"] + checkpointed * m["layer"]) / measured
            result[amp, checkpointed] = (fixed, per_image)
            shares = ", ".join(f"{str(d).replace('torch.', '')} {n / m['kept']:.0%}" for d, n in m["by_dtype"].items())
            name = f"{'bf16 autocast' if amp == 'bf16' else 'fp32'}, {'checkpointed' if checkpointed else 'plain'}"
            fits = ", ".join(f"{g} GiB: {int((g * gib - fixed - gib) // per_image)}" for g in memories)  # 1 GiB: CUDA
            rows[name] = [fixed + b * per_image for b in batches]
            print(f"  {name}: {per_image / 2 ** 20:.1f} MiB per image ({shares}); largest batch in {fits}")
    print(f"{'estimated GiB at batch':32s}" + "".join(f"{b:>8d}" for b in batches))
    for name, values in rows.items():
        print(f"{name:32s}" + "".join(f"{v / gib:8.1f}" for v in values))
    return result


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    memory = "--memory" in argv
    if memory and "--data" not in argv:  # the paper's configuration unless another is asked for
        argv += ["--data", "cuhk"]
    cfgs, _ = parse_config([a for a in argv if a != "--memory"], "tools/train_bench.py",
                                      "where a training step's time goes (train.py's flags); --memory: what "
                                      "it holds in memory, estimated on the CPU (default --data cuhk)")
    keep_freed_memory()
    try:
        if memory:
            local = lambda name: name if name and Path(name).is_dir() else ""  # noqa: E731  (shapes only)
            memory_table(dataclasses.replace(cfgs.model, vision_model=local(cfgs.model.vision_model),
                                             text_model=local(cfgs.model.text_model)), cfgs.loss)
            return 0
        bench(cfgs)
    except EncoderLoadError as err:
        print(f"tools/train_bench.py: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
