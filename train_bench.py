"""`python train_bench.py`: where a training step's time goes, part by part, and the whole
step against its two encoders alone (docs/design.md, decision 8). It takes train.py's flags and
times train.py's State and train_step; train.py does not import it.

    python train_bench.py                        # SynthPEDES preset on this machine
    python train_bench.py --data synth --device cuda
    python train_bench.py --data cuhk --p 32 --device cuda   # the paper's encoders, batch 128

Test: pytest tests/test_train.py -k bench
"""
import dataclasses
import functools
import sys
import time
from pathlib import Path

import numpy as np
import torch

from losses import compute_losses
from model import ModelConfig, ObjectiveConfig
from devices import cpu_has_bf16, forward_context, keep_freed_memory
from encoders import EncoderLoadError
from train import State, TrainConfig, parse_config, pick_device, to_device, train_step


def bench(cfg: TrainConfig, mcfg: ModelConfig, ocfg: ObjectiveConfig, steps: int = 10) -> None:
    """Where a training step's time goes: the median time of each part's forward and backward on
    random inputs of the configured shapes, then the whole step (forward, every loss, GradNorm,
    Adam), and the encoders alone as the baseline (ViT + text encoder, the mean of their outputs
    as the loss; DESIGN.md section 8). Hub encoders are built from their configs with random
    weights (no download). Frozen text layers are timed as training sees them: from the cache
    (filled by the warm-up steps, as train() fills it before the first step)."""
    device = pick_device(cfg.device)
    local = lambda name: name if name and Path(name).is_dir() else ""  # noqa: E731
    mcfg = dataclasses.replace(mcfg, vision_model=local(mcfg.vision_model), text_model=local(mcfg.text_model))
    b, t = cfg.p * cfg.k, mcfg.max_text_len
    g = torch.Generator().manual_seed(cfg.seed)
    text = lambda: {"input_ids": torch.randint(1000, 30000, (b, t), generator=g),  # noqa: E731
                    "attention_mask": torch.ones(b, t, dtype=torch.long)}
    batch = to_device({"images": torch.randn(b, 3, *mcfg.image_size, generator=g),
                       "pids": torch.arange(b) // cfg.k, "identity": text(), "clothing": text()}, device)
    state = State.create(cfg, mcfg, ocfg, device, total_steps=10 ** 6)
    model = state.model
    amp = cfg.amp if device.type == "cuda" or (cfg.amp == "bf16" and cpu_has_bf16()) else "off"  # as forward_context
    context = functools.partial(forward_context, device, cfg.amp)  # as train_step runs the forward
    print(f"device {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}), "
          f"batch {b}, images {mcfg.image_size}, text length {t}, autocast {amp}, "
          f"frozen text layers {mcfg.text_frozen_layers}")
    print(f"{'part (forward + backward)':40s}{'ms / step':>12s}{'share':>8s}")
    rows = bench_parts(state, batch, ocfg, context)
    whole = _median_ms(lambda _: train_step(state, batch, ocfg, device, cfg.amp), steps, device)
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


def bench_parts(state: State, batch: dict, ocfg: ObjectiveConfig, autocast) -> dict:
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
        return out, compute_losses(out, batch, ocfg)

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

    texts = [key for key in ("identity", "clothing") if key != "clothing" or ocfg.loss_aln]
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
                                       forward_backward(lambda out: compute_losses(out, batch, ocfg).values()))
    if ocfg.use_gradnorm:
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


def main(argv=None) -> int:
    cfg, mcfg, ocfg, _ = parse_config(argv, "train_bench.py", __doc__.split("\n")[0].strip('"`'))
    keep_freed_memory()
    try:
        bench(cfg, mcfg, ocfg)
    except EncoderLoadError as err:
        print(f"train_bench.py: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
