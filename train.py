"""Training: identity (P x K) batches, the objective of Eq. 1-6 balanced by GradNorm, checkpoints.

Paper Sec. IV-A (Adam, lr 1e-4, weight decay 1e-3, cosine annealing, GradNorm alpha 1.5) with the
decisions of DESIGN.md section 3: stage-1 InfoNCE plus the fusion InfoNCE over hard negatives,
GradNorm weights learned from the GradNorm loss alone. Each run writes runs/<name>/:
config.json (the resolved configuration), log.jsonl (one line per step: the losses, GradNorm's
weights, the gates' g_std and w_img; one per validation), last.pt and best.pt (best stage-1
Rank-1 on the validation split; each carries the configuration, so `python evaluate.py
--checkpoint FILE` needs nothing beside it), training_curves.png (each task's loss, the task
weights and the validation Rank-1 over training) and results.json (test evaluation);
runs/latest points at the newest run.

    python train.py                                  # SynthPEDES on a CPU, all offline
    python train.py --data cuhk                      # CUHK-PEDES, the paper's encoders, one GPU
    python train.py --ablation "w/o Mamba"           # a row of Tables II-IV (model.ABLATIONS)
    python train.py --use-bdam false --loss-aln false --loss-decouple false   # any field
    python train.py --resume runs/NAME               # continue exactly where it stopped
    python train.py --data cuhk --amp fp16 --grad-checkpoint true  # a GPU without bf16, short of memory
    python -m tools.train_bench                            # step time of the model vs its encoders
    torchrun --nproc_per_node 4 train.py --data cuhk # 4 GPUs (DistributedDataParallel, README)

Every field of TrainConfig, model.ModelConfig and model.ObjectiveConfig is a flag (`--field-name value`).
Tests: pytest tests/test_train.py
"""
import argparse
import dataclasses
import functools
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import data
import evaluate
from synthetic import synthpedes
from helpers.devices import (amp_mode, checkpoint_activations, forward_context, grad_scaler, install_cpu_substitutes,
                     keep_freed_memory, optimizer_step, text_attention_for)
from helpers.distributed import (StopRequest, any_process, from_rank0, gather_batch, init_distributed, leave_process_group,
                         mean_over_processes, rank, world)
from helpers.encoders import EncoderLoadError, load_tokenizer
from losses import GradNorm, compute_losses
from model import ABLATIONS, ModelConfig, ObjectiveConfig, T2IReID, load_configs, replace_fields
from helpers.pictures import read_log, training_picture

# ----------------------------------------------------------------------------------------------
# Configuration


@dataclass
class TrainConfig:
    data: str = "cuhk"  # synth | cuhk | icfg | rstp
    root: str = "data"  # data root, data.py's layout
    name: str = ""  # run folder under runs/; "" = <data>-<date>-<time>
    epochs: int = 60  # not stated in the paper; IRRA's schedule
    p: int = 16  # identities per batch (not stated; batch 64 as IRRA)
    k: int = 4  # images per identity, for the batch-hard triplet (Eq. 4)
    lr: float = 1e-4  # Sec. IV-A, Adam
    pretrained_lr_scale: float = 1.0  # encoders loaded pretrained train at lr * this (Sec. IV-A: 1)
    weight_decay: float = 1e-3  # Sec. IV-A
    warmup_steps: int = 0  # linear warm-up before the cosine annealing (Sec. IV-A: none)
    erase_p: float = 0.5  # random erasing's probability (IRRA's augmentation; not in the paper)
    gradnorm_lr: float = 0.025  # Adam on the task weights s_k (Chen et al. 2018)
    max_steps: int = 0  # stop after this many optimiser steps (0: all epochs)
    checkpoint_every: int = 200  # steps between last.pt saves inside an epoch
    eval_batch: int = 128
    workers: int = -1  # data loader processes; -1: 0 on a CPU (the cores train), else the cores less one, at most 8
    device: str = "auto"  # auto | cpu | cuda
    amp: str = "bf16"  # bf16 | fp16 (a GPU without bf16; with a GradScaler) | off: autocast (devices.forward_context)
    grad_checkpoint: bool = False  # recompute each ViT, text and BDAM layer in the backward (devices.checkpoint_activations)
    seed: int = 0  # the paper reports the mean over seeds 0, 1, 2
    synth_ids: int = 300  # SynthPEDES identities (synthpedes.SynthConfig)
    synth_regime: str = "cloth-changing"  # or same-clothes
    synth_train_images: int = 0  # photographs of each training identity, over its outfits (0: as val/test)
    final_eval: bool = True  # evaluate on the test split at the end (results.json)

    def __post_init__(self):
        self.amp = amp_mode(self.amp)  # true / false, as runs before fp16 saved it: bf16 / off


def presets(dataset: str) -> tuple[TrainConfig, ModelConfig, ObjectiveConfig]:
    """The real benchmarks use the paper's encoders at 224 x 224 on a GPU; SynthPEDES uses the
    small encoders and a schedule that trains on two CPU cores in under ten minutes (README,
    design decision 10, says why each choice was made and what it was measured against)."""
    if dataset == "synth":
        # 16 identities x 2 images: twice the distinct identities of 8 x 4 per batch, more
        # negatives for every InfoNCE; one epoch over 72 photographs of each training identity
        # (24 of each of its 3 outfits, or 72 of its one outfit in same-clothes, so that both
        # regimes train as long; the validation and test images are those of the default
        # dataset) rather than more epochs over fewer (2 over 18 lost to 1 over 36): new
        # photographs generalise, repeats are memorised; 72 rather than 48 since the step's cost
        # halved (validation mAP across outfits 34.2 against 33.7; docs/experiments.md);
        # tau 0.07: at 0.02 the first (random) logits are so confident that collapsing the text
        # embeddings to one point is the quickest way down, and training stalls at log(batch);
        # no random erasing: each photograph is seen once, so it guards against no memorising and
        # only hides the traits that its caption names (README, design decision 10)
        train = TrainConfig(data="synth", epochs=1, p=16, k=2, lr=1e-3, pretrained_lr_scale=0.1,
                            warmup_steps=20, synth_train_images=72, erase_p=0.0)
        # MiniLM's bottom 5 layers frozen and cached; a BatchNorm before the BDAM gate, without
        # which the gate gives every image the same g
        model = ModelConfig.small(max_text_len=48, text_frozen_layers=5, bdam_gate_norm=True)
        objective = ObjectiveConfig(temperature=0.07)
        return train, model, objective
    return TrainConfig(data=dataset), ModelConfig(), ObjectiveConfig()


def _parse_value(text: str, kind):
    """A command-line string as a field of type `kind` (bool, int, float, str, tuple of ints)."""
    if kind is bool or kind == "bool":
        if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
        return text.lower() in ("true", "1", "yes")
    if kind in (int, "int"):
        return int(text)
    if kind in (float, "float"):
        return float(text)
    if str(kind).startswith("tuple"):
        return tuple(int(v) for v in text.replace("x", ",").split(","))
    return text


def parse_config(argv=None, prog=None,
                 description=None) -> tuple[TrainConfig, ModelConfig, ObjectiveConfig, argparse.Namespace]:
    """Flags: every field of TrainConfig, ModelConfig and ObjectiveConfig, --ablation ROW, --resume
    DIR (also tools/train_bench.py's). The dataset's preset comes first, then the ablation row, then the
    fields."""
    parser = argparse.ArgumentParser(prog=prog, description=description or __doc__.split("\n")[0])
    parser.add_argument("--resume", default="", help="a run folder to continue")
    parser.add_argument("--ablation", default="full", choices=list(ABLATIONS),
                        help="a row of Tables II-IV")
    owners, synth, paper = {}, presets("synth"), presets("cuhk")
    for cls, small, full in zip((TrainConfig, ModelConfig, ObjectiveConfig), synth, paper):
        for f in dataclasses.fields(cls):
            assert f.name not in owners, f"field {f.name} is in two configs"
            owners[f.name] = cls
            a, b = getattr(small, f.name), getattr(full, f.name)
            shown = "synth; choices synth|cuhk|icfg|rstp" if f.name == "data" else (
                a if a == b else f"{a} with --data synth, {b} with cuhk|icfg|rstp")
            parser.add_argument(f"--{f.name.replace('_', '-')}", type=lambda s, t=f.type: _parse_value(s, t), default=None,
                                help=f"{cls.__name__}.{f.name} (default: {shown})")
    args = parser.parse_args(argv)
    given = {name: value for name, value in vars(args).items() if name in owners and value is not None}
    if args.resume:
        if given or args.ablation != "full":
            parser.error("--resume continues a run with its saved configuration; give no other fields")
        saved = json.loads((Path(args.resume) / "config.json").read_text())
        return TrainConfig(**saved["train"]), *load_configs(saved), args  # load_configs reads old runs' too
    train, model, objective = presets(given.get("data", "synth"))
    try:  # an ablation row or the flags may set fields of both ModelConfig and ObjectiveConfig
        model, objective = replace_fields(model, objective, ABLATIONS[args.ablation])
        train = dataclasses.replace(train, **{k: v for k, v in given.items() if owners[k] is TrainConfig})
        model, objective = replace_fields(model, objective, {k: v for k, v in given.items()
                                                             if owners[k] is not TrainConfig})
    except ValueError as err:  # each config's checks and model.check_pair's: inconsistent switches
        parser.error(str(err))
    if train.data not in data.DATASETS:
        parser.error(f"--data must be one of {data.DATASETS}")
    return train, model, objective, args


class TrainingError(RuntimeError):
    """A run that cannot go on (a non-finite loss, a missing checkpoint); printed, no traceback."""


# ----------------------------------------------------------------------------------------------
# Data: the dataset, its descriptions, and batches that a resumed run replays exactly


def prepare_data(cfg: TrainConfig) -> None:
    """The dataset and its identity/clothing descriptions must exist before training. SynthPEDES
    is made here when missing (data, then offline descriptions); a real benchmark is not."""
    described = data.descriptions_file(cfg.data, cfg.root)
    if cfg.data == "synth":
        outfits = synthpedes.SynthConfig(regime=cfg.synth_regime).outfits_per_id
        per_outfit = -(-cfg.synth_train_images // outfits) or None  # rounded up; 0: the default
        synthpedes.ensure_synthpedes(cfg.root, num_ids=cfg.synth_ids, regime=cfg.synth_regime,
                                     train_images_per_outfit=per_outfit)
        images = len(data.read_annotations("synth", cfg.root).records)
        if not described.exists() or len(data.read_descriptions(described)) < images:
            print(f"writing the missing SynthPEDES descriptions to {described} "
                  "(python describe.py: style clusters + the offline rules backend)", file=sys.stderr)
            import describe  # offline here: the rules backend calls no network
            describe.run(describe.DescribeConfig(data="synth", root=cfg.root))
        return
    data.read_annotations(cfg.data, cfg.root)  # a missing dataset says where the files go
    if not described.exists():
        raise data.DatasetError(
            f"{described} is missing: training needs the identity and clothing descriptions of "
            f"every image (paper Sec. III-B). Write them first with\n"
            f"  OPENAI_API_KEY=... python describe.py --data {cfg.data} --root {cfg.root} "
            f"--backend openai --model gpt-4o-mini\n"
            f"or offline, from the captions alone: python describe.py --data {cfg.data} "
            f"--root {cfg.root} --backend rules")


def load_splits(cfg: TrainConfig) -> tuple[data.ReIDData, data.ReIDData | None]:
    """The training and test splits, and the validation split or None where there is none
    (ICFG-PEDES, or a converted file with no "val" records: the last epoch is then best.pt, beta
    the config's or 0, as one line says). No test records is an error before training starts."""
    dataset, val = data.load_dataset(cfg.data, cfg.root), data.load_validation(cfg.data, cfg.root)
    file = data.annotation_file(cfg.data, cfg.root)
    if cfg.final_eval and not dataset.gallery:
        raise data.DatasetError(f'{file}: no "test" records, which the final evaluation needs: '
                                f'add them, or pass --final-eval false')
    if val is None and rank() == 0:
        print(f'{file}: no validation split (no "val" records): best.pt is the last epoch and the clothing '
              f'weight beta the config\'s or 0', file=sys.stderr)
    return dataset, val


class SeededItems(torch.utils.data.Dataset):
    """Item (epoch, i) of a TrainSet, its augmentation drawn from a generator seeded by
    (seed, epoch, i): the batches of a resumed run are the batches it would have seen, with any
    number of loader workers, and the main process's RNG (dropout) is left alone."""

    def __init__(self, dataset: data.TrainSet, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        epoch, i = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((self.seed * 1_000_003 + epoch) * 10_000_019 + i)
            return self.dataset[i]


def make_loader(items: SeededItems, sampler: data.IdentitySampler, epoch: int, skip: int,
                tokenizer, cfg: TrainConfig, max_len: int):
    """The P x K batches of `epoch`, less the first `skip` (already trained on)."""
    sampler.set_epoch(epoch)
    batches = [[(epoch, i) for i in batch] for batch in list(sampler)[skip:]]
    collate = functools.partial(data.collate, tokenizer=tokenizer, max_len=max_len)
    # its own generator: creating the iterator must not draw from the main RNG (dropout)
    return torch.utils.data.DataLoader(items, batch_sampler=batches, collate_fn=collate,
                                       num_workers=loader_workers(cfg.workers, cfg.device),
                                       pin_memory=torch.cuda.is_available(), worker_init_fn=leave_process_group,
                                       generator=torch.Generator().manual_seed(cfg.seed))


def loader_workers(workers: int, device: str) -> int:
    """--workers as given, or for -1: none on a CPU, where the cores are busy with the step
    itself, and on a GPU the cores less one for the main process (at most 8), so that decoding
    and augmenting images keeps up with the device."""
    if workers >= 0:
        return workers
    if pick_device(device).type == "cpu":
        return 0
    return max(1, min(8, (os.cpu_count() or 2) - 1))


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: to_device(v, device) if isinstance(v, dict) else v.to(device, non_blocking=True)
            for k, v in batch.items()}


# ----------------------------------------------------------------------------------------------
# The training state: everything a checkpoint holds


@dataclass
class State:
    model: T2IReID
    gradnorm: GradNorm
    optimizer: torch.optim.Optimizer  # the network: Adam, Sec. IV-A
    weight_optimizer: torch.optim.Optimizer  # the GradNorm task weights s_k
    schedule: torch.optim.lr_scheduler.LambdaLR
    epoch: int = 0
    step_in_epoch: int = 0  # batches of `epoch` already trained on
    global_step: int = 0
    best: float = -1.0  # best validation Rank-1 so far
    ddp: torch.nn.Module | None = None  # the model under DistributedDataParallel (torchrun)
    config: dict | None = None  # run_config: config.json's dict, in every checkpoint
    scaler: torch.amp.GradScaler | None = None  # --amp fp16 on a GPU (devices.grad_scaler)

    @classmethod
    def create(cls, cfg: TrainConfig, mcfg: ModelConfig, ocfg: ObjectiveConfig, device, total_steps: int) -> "State":
        model = T2IReID(mcfg, ocfg).to(device)
        text_attention_for(model.text, torch.device(device))
        install_cpu_substitutes(model, torch.device(device))  # devices.Dropout and CPUAttention on a CPU
        if cfg.grad_checkpoint:
            checkpoint_activations(model)
        reg = ocfg.weight_reg if ocfg.use_weight_reg else 0.0
        gradnorm = GradNorm(ocfg.balanced_names(), alpha=ocfg.gradnorm_alpha, reg_lambda=reg).to(device)
        pretrained = [encoder for encoder, name in ((model.vision, mcfg.vision_model), (model.text, mcfg.text_model))
                      if name]  # "" = built from its config with random weights
        slow = {id(p) for encoder in pretrained for p in encoder.parameters()}
        trained = [p for p in model.parameters() if p.requires_grad]  # not the frozen text layers
        groups = [{"params": [p for p in trained if id(p) not in slow], "lr": cfg.lr},
                  {"params": [p for p in trained if id(p) in slow], "lr": cfg.lr * cfg.pretrained_lr_scale}]
        # fused: one kernel for every parameter (4-5x faster than the per-tensor loop on a CPU)
        optimizer = torch.optim.Adam(groups, weight_decay=cfg.weight_decay,
                                     fused=torch.device(device).type in ("cpu", "cuda"))
        weight_optimizer = torch.optim.Adam(gradnorm.parameters(), lr=cfg.gradnorm_lr)

        def lr_factor(step):  # linear warm-up, then cosine annealing to 0 (Sec. IV-A)
            if step < cfg.warmup_steps:
                return (step + 1) / cfg.warmup_steps
            progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
        return cls(model, gradnorm, optimizer, weight_optimizer, schedule, config=run_config(cfg, mcfg, ocfg),
                   scaler=grad_scaler(torch.device(device), cfg.amp))

    def state_dict(self) -> dict:
        """Everything a resumed run needs; with several processes a collective (every process
        calls it, rank 0 writes it): the weights are the same everywhere, the RNGs (dropout) are
        not, so "rng_ranks" holds each process's and "rng" rank 0's."""
        rng = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
               "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
        rng_ranks = [rng] * world()
        if world() > 1:
            dist.all_gather_object(rng_ranks, rng)
        parts = ("model", "gradnorm", "optimizer", "weight_optimizer", "schedule") + ("scaler",) * bool(self.scaler)
        counters = ("epoch", "step_in_epoch", "global_step", "best")
        return {**{p: getattr(self, p).state_dict() for p in parts}, **{c: getattr(self, c) for c in counters},
                "rng": rng_ranks[0], "rng_ranks": rng_ranks, "config": self.config}

    def load_state_dict(self, saved: dict) -> None:
        """Every process reads the same last.pt and takes its own RNG. Resumed with another
        number of processes, the batches and weights go on exactly, the dropout masks do not."""
        for part in ("model", "gradnorm", "optimizer", "weight_optimizer", "schedule") + ("scaler",) * bool(self.scaler):
            getattr(self, part).load_state_dict(saved[part])
        for counter in ("epoch", "step_in_epoch", "global_step", "best"):
            setattr(self, counter, saved[counter])
        rngs = saved.get("rng_ranks", [saved["rng"]])
        if len(rngs) != world() and rank() == 0:
            print(f"last.pt was saved by {len(rngs)} processes, resumed by {world()}: the same batches "
                  f"and weights, other dropout masks", file=sys.stderr)
        rng = rngs[rank()] if len(rngs) == world() else rngs[0] if rank() == 0 else None
        if rng is not None:
            torch.set_rng_state(rng["torch"])
            np.random.set_state(rng["numpy"])
            random.setstate(rng["python"])
            if rng["cuda"] and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])


def save(obj: dict, path: Path) -> None:
    """Write to a temporary file, then rename: a kill mid-write never leaves a broken file."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def checkpoint(state: State, path: Path) -> None:
    """last.pt: every process takes part (the RNGs), rank 0 writes."""
    saved = state.state_dict()
    if rank() == 0:
        save(saved, path)


def save_best(state: State, score: float | None, path: Path) -> None:
    """best.pt: the weights, their epoch and validation Rank-1, and the run's configuration, so
    that the file alone is a model (`python evaluate.py --checkpoint best.pt`)."""
    save({"model": state.model.state_dict(), "epoch": state.epoch, "val_R1": score, "config": state.config}, path)


# ----------------------------------------------------------------------------------------------
# One step, one epoch


def train_step(state: State, batch: dict, ocfg: ObjectiveConfig, device, amp: str) -> dict:
    """Forward, the named losses over the global batch, one update (the log row)."""
    batch = to_device(batch, device)
    with forward_context(device, amp):
        out, labels = gather_batch((state.ddp or state.model)(batch), batch)  # the global batch
        losses = {name: loss.float() for name, loss in compute_losses(out, labels, ocfg).items()}
    return {**update(state, losses, ocfg), **gate_stats(out)}


def gate_stats(out: dict) -> dict:
    """The gates of Fig. 5 on this batch, for the log: g_std, the BDAM gate's per-channel standard
    deviation over the images (0: the same g for every image), and w_img, the fusion gate's mean
    W_img on each text's own image (near 0: the fusion reads the text alone)."""
    stats = {}
    if out.get("bdam_gate") is not None and len(out["bdam_gate"]) > 1:
        stats["g_std"] = out["bdam_gate"].detach().float().std(0).mean().item()
    if out.get("fusion_gate") is not None:
        stats["w_img"] = out["fusion_gate"].float().mean().item()
    return stats


def update(state: State, losses: dict[str, torch.Tensor], ocfg: ObjectiveConfig) -> dict:
    """GradNorm (Eq. 5) and the weighted total (Eq. 6) from the named losses, one optimiser
    step of the network and of the task weights: the log row (the losses, L_total, each w_k
    and each G_k)."""
    values = {name: loss.detach().item() for name, loss in losses.items()}
    bad = {name: value for name, value in values.items() if not math.isfinite(value)}
    if bad:
        raise TrainingError(f"loss {', '.join(f'{k} = {v}' for k, v in bad.items())} at step "
                            f"{state.global_step + 1} (epoch {state.epoch + 1}); lower --lr or turn "
                            f"--amp off{not_float32(state.model)}; last.pt still holds the last good state")
    shared = state.model.shared_parameter()
    # fp16: every backward runs on the losses times the GradScaler's factor (1 otherwise)
    scale = state.scaler.scale(torch.ones((), device=shared.device)).squeeze() if state.scaler else 1.0
    if ocfg.use_gradnorm:
        stats = state.gradnorm.backward(losses, shared, mean_over_processes if world() > 1 else None, scale)
    else:  # every weight stays 1
        stats = {"total": sum(losses.values())}
        (stats["total"] * scale).backward()
    optimizer_step(state.optimizer, state.scaler)
    state.schedule.step()
    state.optimizer.zero_grad(set_to_none=True)
    if ocfg.use_gradnorm:
        state.weight_optimizer.step()
    state.weight_optimizer.zero_grad(set_to_none=True)
    weights = state.gradnorm.weights().tolist()
    norms = stats["grad_norms"].tolist() if "grad_norms" in stats else []  # G_k of Eq. 5
    return {**values, "total": stats["total"].detach().item(),
            **{f"w_{task}": w for task, w in zip(state.gradnorm.tasks, weights)},
            **{f"G_{task}": g for task, g in zip(state.gradnorm.tasks, norms)}}


def not_float32(model: torch.nn.Module) -> str:
    """The trained parameters that are not float32, for the error of a non-finite loss ("; the
    model holds float16 parameters (N tensors): names"), or "": Adam on half-precision weights
    overflows, which is why helpers/encoders.py loads every encoder in float32."""
    held = {}
    for name, p in model.named_parameters():
        if p.requires_grad and p.dtype != torch.float32:
            held.setdefault(str(p.dtype).removeprefix("torch."), []).append(name)
    return "".join(f"; the model holds {dtype} parameters ({len(names)} tensors): {', '.join(names[:4])}"
                   + ", ..." * (len(names) > 4) for dtype, names in held.items())


def run_epoch(state: State, loader, cfg: TrainConfig, ocfg: ObjectiveConfig, device, run: Path,
              log, stop: StopRequest) -> bool:
    """Train on the batches of one epoch; False if stopped early (max_steps or a stop request)."""
    bar = tqdm(loader, desc=f"epoch {state.epoch + 1}/{cfg.epochs}", dynamic_ncols=True,
               initial=state.step_in_epoch, total=state.step_in_epoch + len(loader), disable=rank() > 0)
    tick = time.perf_counter()
    for batch in bar:
        row = train_step(state, batch, ocfg, device, cfg.amp)
        state.step_in_epoch += 1
        state.global_step += 1
        now = time.perf_counter()
        row.update(step=state.global_step, epoch=state.epoch, lr=state.schedule.get_last_lr()[0],
                   images_per_s=len(batch["pids"]) * world() / (now - tick))
        tick = now
        log.write(json.dumps(row) + "\n")
        log.flush()
        bar.set_postfix(loss=f"{row['total']:.3f}", img_s=f"{row['images_per_s']:.1f}")
        if state.global_step % cfg.checkpoint_every == 0:
            checkpoint(state, run / "last.pt")
        stop.requested = any_process(stop.requested, device)
        if stop.requested or (cfg.max_steps and state.global_step >= cfg.max_steps):
            return False
    return True


def training_items(dataset: data.ReIDData, cfg: TrainConfig, mcfg: ModelConfig) -> SeededItems:
    """The training split as seeded items with the run's augmentation (random erasing at
    cfg.erase_p), the one place that builds them."""
    transform = data.train_transform(mcfg.image_size, cfg.erase_p)
    return SeededItems(data.TrainSet(dataset.train, transform), cfg.seed)


@torch.no_grad()
def fill_text_cache(model: T2IReID, texts: list[str], tokenizer, max_len: int, device, chunk: int = 64) -> None:
    """The frozen text layers' states of every training text, computed once before the first
    step, in sorted order (model.FrozenTextPrefix): an epoch then costs only the layers above."""
    if model.frozen_text is None:
        return
    texts = sorted(texts, key=lambda text: (len(text), text))  # similar lengths pad little
    for start in tqdm(range(0, len(texts), chunk), desc=f"frozen text layers: {len(texts)} texts", leave=False,
                      disable=rank() > 0):
        tokens = to_device(data.tokenize(tokenizer, texts[start:start + chunk], max_len), device)
        model.frozen_text.fill(**tokens)


def validate(state: State, val, tokenizer, cfg: TrainConfig, mcfg: ModelConfig, device) -> float:
    """Stage-1 Rank-1 on the validation split (model selection; no test data is looked at)."""
    metrics = evaluate.evaluate_model(state.model, val, tokenizer, mcfg.image_size, mcfg.max_text_len,
                                      device, batch_size=cfg.eval_batch, rerank_k=0,
                                      robustness=False, progress=False)
    state.model.train()
    return metrics["stage1"]["R1"]


# ----------------------------------------------------------------------------------------------
# The run


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise TrainingError("--device cuda, but torch sees no GPU; use --device cpu")
    return torch.device(name)


def start_run(cfg: TrainConfig, mcfg: ModelConfig, ocfg: ObjectiveConfig, run: Path | None) -> tuple[Path, bool]:
    """A new run folder with config.json, or the folder of a run to resume; runs/latest -> it."""
    resume = run is not None
    if resume and not (run / "last.pt").exists():
        raise TrainingError(f"{run / 'last.pt'} does not exist: nothing to resume")
    if not resume:
        run = Path("runs") / (cfg.name or f"{cfg.data}-{time.strftime('%Y%m%d-%H%M%S')}")
        run.mkdir(parents=True, exist_ok=True)
        (run / "config.json").write_text(json.dumps(run_config(cfg, mcfg, ocfg), indent=2) + "\n")
    latest = run.parent / "latest"
    if latest.is_symlink() or not latest.exists():
        latest.unlink(missing_ok=True)
        latest.symlink_to(run.resolve(), target_is_directory=True)
    return run, resume


def run_config(cfg: TrainConfig, mcfg: ModelConfig, ocfg: ObjectiveConfig) -> dict:
    """The resolved configuration as config.json holds it (tuples as lists), and every checkpoint."""
    return json.loads(json.dumps({"train": dataclasses.asdict(cfg), "model": dataclasses.asdict(mcfg),
                                  "objective": dataclasses.asdict(ocfg)}))


def trim_log(path: Path, last_step: int) -> None:
    """On resume, drop the log lines of steps after the checkpoint: they are trained again."""
    if path.exists():
        rows = [line for line in path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= last_step]
        path.write_text("".join(row + "\n" for row in rows))


def train(cfg: TrainConfig, mcfg: ModelConfig, ocfg: ObjectiveConfig, run: Path | None = None) -> Path:
    """Train (or resume `run`), keep last.pt / best.pt, evaluate on the test split at the end.
    Under torchrun every process runs this; rank 0 alone prepares the data, writes the run
    folder and the log, validates and evaluates."""
    device = init_distributed(pick_device(cfg.device))
    if rank() == 0:
        prepare_data(cfg)
    if world() > 1:
        dist.barrier()  # the data rank 0 may have just written
    dataset, val = load_splits(cfg)
    tokenizer = load_tokenizer(mcfg.text_model or None)  # "" = random BERT, same vocabulary
    torch.manual_seed(cfg.seed), np.random.seed(cfg.seed), random.seed(cfg.seed)
    try:
        sampler = data.IdentitySampler([s.pid for s in dataset.train], cfg.p, cfg.k, seed=cfg.seed,
                                       rank=rank(), world=world())
    except ValueError as err:  # too few identities, or P not a multiple of the processes
        raise TrainingError(str(err)) from None
    state = State.create(cfg, mcfg, ocfg, device, total_steps=cfg.epochs * len(sampler))
    if rank() > 0:  # dropout masks of its own; rank 0 draws what one process would
        torch.manual_seed(cfg.seed * 1_000_003 + rank())
    run, resume = from_rank0(start_run(cfg, mcfg, ocfg, run) if rank() == 0 else None)
    if resume:
        state.load_state_dict(torch.load(run / "last.pt", map_location=device, weights_only=False))
        if rank() == 0:
            trim_log(run / "log.jsonl", state.global_step)
            print(f"resuming {run} at epoch {state.epoch + 1}, step {state.global_step}", file=sys.stderr)
    if world() > 1:  # frozen parameters (requires_grad False) are left out by DDP itself
        state.ddp = torch.nn.parallel.DistributedDataParallel(
            state.model, device_ids=[device] if device.type == "cuda" else None)
    items = training_items(dataset, cfg, mcfg)
    fill_text_cache(state.model, items.dataset.texts(), tokenizer, mcfg.max_text_len, device)
    state.model.train()
    with open(run / "log.jsonl" if rank() == 0 else os.devnull, "a") as log, StopRequest() as stop:
        while state.epoch < cfg.epochs:
            loader = make_loader(items, sampler, state.epoch, state.step_in_epoch, tokenizer, cfg,
                                 mcfg.max_text_len)
            if not run_epoch(state, loader, cfg, ocfg, device, run, log, stop):
                checkpoint(state, run / "last.pt")  # stopped inside the epoch
                break
            state.epoch, state.step_in_epoch = state.epoch + 1, 0
            if rank() == 0:
                end_epoch(state, val, tokenizer, cfg, mcfg, device, run, log)
            checkpoint(state, run / "last.pt")
    if stop.requested:
        again = "python train.py" if world() == 1 else "the same torchrun command with train.py"
        raise KeyboardInterrupt(f"stopped at step {state.global_step}; continue with: {again} --resume {run}")
    if rank() > 0:
        return run
    if picture := training_picture(read_log(run / "log.jsonl"), run / "training_curves.png"):
        print(f"wrote {picture}")
    if not (run / "best.pt").exists():  # stopped by max_steps before the first epoch ended
        save_best(state, None, run / "best.pt")
    if cfg.final_eval:
        final_evaluation(state.model, run, dataset, val, tokenizer, cfg, mcfg, ocfg, device)
    return run


def end_epoch(state: State, val, tokenizer, cfg: TrainConfig, mcfg: ModelConfig, device, run: Path,
              log) -> None:
    """After each epoch (rank 0): the validation Rank-1 in the log, best.pt when it improved."""
    score = validate(state, val, tokenizer, cfg, mcfg, device) if val else None
    log.write(json.dumps({"step": state.global_step, "epoch": state.epoch, "val_R1": score}) + "\n")
    if score is None or score > state.best:  # no validation split: the last epoch is the best
        state.best = state.best if score is None else score
        save_best(state, score, run / "best.pt")


def final_evaluation(model: T2IReID, run: Path, dataset, val, tokenizer, cfg: TrainConfig,
                     mcfg: ModelConfig, ocfg: ObjectiveConfig, device) -> None:
    """best.pt on the test split: both stages and Table V -> results.json. The retrieval settings
    (beta, then K and the fusion weight a) are the config's, or (when < 0) chosen first on `val`,
    the validation split (None: the dataset has none, load_splits)."""
    best = torch.load(run / "best.pt", map_location=device, weights_only=False)
    model.load_state_dict(best["model"])
    beta, sweep = evaluate.choose_clothing_weight(model, val, tokenizer, mcfg, ocfg, device, cfg.eval_batch, cfg.seed)
    k, a, rerank_rows = evaluate.choose_rerank(model, val, tokenizer, mcfg, ocfg, device, cfg.eval_batch, beta)
    chosen = dict(clothing_weight=beta, rerank_k=k, fusion_weight=a)
    if any(best.get(key) != value for key, value in chosen.items()):
        save({**best, **chosen}, run / "best.pt")  # evaluate.py reads them from there
    results = evaluate.evaluate_model(model, dataset, tokenizer, mcfg.image_size, mcfg.max_text_len,
                                      device, batch_size=cfg.eval_batch, clothing_weight=beta,
                                      rerank_k=k, fusion_weight=a)
    results.update(clothing_weight_sweep=sweep, rerank_sweep=rerank_rows)
    (run / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    print(evaluate.report(results))
    print(f"wrote {run / 'results.json'}; pictures: python evaluate.py --run {run}")


def main(argv=None) -> int:
    cfg, mcfg, ocfg, args = parse_config(argv)
    keep_freed_memory()
    try:
        train(cfg, mcfg, ocfg, Path(args.resume) if args.resume else None)
    except (data.DatasetError, EncoderLoadError, TrainingError, evaluate.RunError) as err:
        print(f"train.py: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as stop:
        if rank() == 0:
            print(f"train.py: {stop or 'interrupted'}", file=sys.stderr)
        return 130
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
