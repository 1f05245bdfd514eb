"""Training: identity (P x K) batches, the objective of Eq. 1-6 balanced by GradNorm, checkpoints.

Paper Sec. IV-A (Adam, lr 1e-4, weight decay 1e-3, cosine annealing, GradNorm alpha 1.5) with
the decisions of docs/design.md#design-decisions. Each run writes runs/<name>/: config.json (the
resolved configuration), log.jsonl (one line per step: the losses, GradNorm's weights, the
gates; one per validation), last.pt and best.pt (best stage-1 validation Rank-1; each carries
the configuration), training_curves.png and results.json (the test evaluation, with the
retrieval settings chosen on the validation split); runs/latest points at the newest run.

    python train.py                                  # SynthPEDES on a CPU, all offline
    python train.py --data cuhk                      # CUHK-PEDES, the paper's encoders, one GPU
    python train.py --ablation "w/o Mamba"           # a row of Tables II-IV (ABLATIONS)
    python train.py --use-bdam false --loss-aln false --loss-decouple false   # any field
    python train.py --resume runs/NAME               # continue exactly where it stopped
    python train.py --data cuhk --amp fp16 --grad-checkpoint true  # a GPU without bf16, short of memory
    torchrun --nproc_per_node 4 train.py --data cuhk # 4 GPUs (DistributedDataParallel, README)

Every field of TrainConfig, model.ModelConfig, losses.LossConfig and evaluate.RetrievalConfig is
a flag (`--field-name value`). Tests: pytest tests/test_train.py
"""
import argparse
import dataclasses
import json
import math
import os
import random
import shlex
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
from evaluate import RetrievalConfig
from helpers.batches import fill_text_cache, make_loader, to_device, training_items
from helpers.checkpoints import random_states, restore_random_states, save
from helpers.cli import add_config_flags, given
from helpers.devices import (amp_mode, checkpoint_activations, forward_context, grad_scaler, install_cpu_substitutes,
                             keep_freed_memory, not_float32, optimizer_step, text_attention_for)
from helpers.distributed import (StopRequest, any_process, from_rank0, gather_batch, init_distributed,
                                 mean_over_processes, rank, world)
from helpers.encoders import EncoderLoadError, load_tokenizer
from helpers.pictures import read_log, training_picture
from helpers.reports import gate_stats
from helpers.runs import start_run, trim_log
from losses import GradNorm, LossConfig, compute_losses
from model import ModelConfig, T2IReID
from synthetic import synthpedes

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
    grad_checkpoint: bool = False  # recompute each layer in the backward (devices.checkpoint_activations)
    seed: int = 0  # the paper reports the mean over seeds 0, 1, 2
    synth_ids: int = 300  # SynthPEDES identities (synthpedes.SynthConfig)
    synth_regime: str = "cloth-changing"  # or same-clothes
    synth_train_images: int = 0  # photographs of each training identity, over its outfits (0: as val/test)
    final_eval: bool = True  # evaluate on the test split at the end (results.json)

    def __post_init__(self):
        self.amp = amp_mode(self.amp)  # true / false, as runs before fp16 saved it: bf16 / off


@dataclass
class Configs:
    """One run's configuration, one config per owner: what config.json and every checkpoint hold."""
    train: TrainConfig
    model: ModelConfig
    loss: LossConfig
    retrieval: RetrievalConfig

    def as_dict(self) -> dict:
        return json.loads(json.dumps({owner: dataclasses.asdict(getattr(self, owner)) for owner in OWNERS}))


OWNERS = {"train": TrainConfig, "model": ModelConfig, "loss": LossConfig, "retrieval": RetrievalConfig}


def presets(dataset: str) -> Configs:
    """The real benchmarks: the paper's encoders at 224 x 224 on a GPU. SynthPEDES: the small
    encoders and a schedule that trains on two CPU cores in minutes
    (docs/design.md#10-synthpedes-preset says why each choice and what it was measured against)."""
    if dataset != "synth":
        return Configs(TrainConfig(data=dataset), ModelConfig(), LossConfig(), RetrievalConfig())
    train_cfg = TrainConfig(data="synth", epochs=1, p=16, k=2, lr=1e-3, pretrained_lr_scale=0.1,
                            warmup_steps=20, synth_train_images=72, erase_p=0.0)
    model_cfg = ModelConfig.small(max_text_len=48, text_frozen_layers=5, bdam_gate_norm=True)
    return Configs(train_cfg, model_cfg, LossConfig(temperature=0.07), RetrievalConfig())


# The rows of Tables II-IV, as the flags that make each
ABLATIONS = {
    "full": "",
    "w/o BDAM": "--use-bdam false --loss-aln false --loss-decouple false",  # Table II
    "w/o cross-attention": "--bdam-cross-attention false",
    "w/o BDAM gate": "--bdam-gate false",
    "shallow BDAM": "--bdam-depth 1",
    "w/o fusion": "--use-fusion false --loss-fusion false",  # Table III
    "w/o Mamba": "--fusion-mamba false",
    "w/o fusion gate": "--fusion-gate false",
    "w/o alignment": "--fusion-align false",
    "w/o L_aln": "--loss-aln false --clothing-stream false",  # Table IV
    "w/o L_decouple": "--loss-decouple false",
    "w/o L_info": "--loss-info false",
    "w/o L_tri": "--loss-triplet false",
    "w/o GradNorm": "--use-gradnorm false",
    "w/o weight regulariser": "--use-weight-reg false",
}


def check_configs(cfgs: Configs) -> None:
    """A loss needs the part of the model it trains (ValueError naming the fix)."""
    model_cfg, loss_cfg = cfgs.model, cfgs.loss
    if loss_cfg.loss_aln and not (model_cfg.use_bdam and model_cfg.clothing_stream):
        raise ValueError("loss_aln needs the clothing stream (use_bdam and clothing_stream): set loss_aln=False")
    if loss_cfg.loss_decouple and not model_cfg.use_bdam:
        raise ValueError("use_bdam=False leaves no clothing feature: set loss_aln=False, loss_decouple=False")
    if loss_cfg.loss_fusion and not model_cfg.use_fusion:
        raise ValueError("use_fusion=False: set loss_fusion=False too")


def parse_config(argv=None, prog=None, description=None) -> tuple[Configs, argparse.Namespace]:
    """Flags: every field of the four configs, --ablation ROW, --resume DIR. The dataset's preset
    comes first, then the ablation row's flags, then the flags given."""
    parser = argparse.ArgumentParser(prog=prog, description=description or __doc__.split("\n")[0])
    parser.add_argument("--resume", default="", help="a run folder to continue")
    parser.add_argument("--ablation", default="full", choices=list(ABLATIONS), help="a row of Tables II-IV")
    for owner, small, full in zip(OWNERS, vars(presets("synth")).values(), vars(presets("cuhk")).values()):
        add_config_flags(parser, owner, small, full)
    args = parser.parse_args(argv)
    if args.resume:
        if any(given(args, owner) for owner in OWNERS) or args.ablation != "full":
            parser.error("--resume continues a run with its saved configuration; give no other fields")
        saved = json.loads((Path(args.resume) / "config.json").read_text())
        return Configs(*(evaluate.model_config(saved) if owner == "model" else
                         evaluate.config_of(cls, saved.get("objective", {}), saved.get(owner, {}))
                         for owner, cls in OWNERS.items())), args
    both = parser.parse_args(shlex.split(ABLATIONS[args.ablation]) + list(sys.argv[1:] if argv is None else argv))
    preset = presets(given(both, "train").get("data", "synth"))
    try:
        cfgs = Configs(*(dataclasses.replace(getattr(preset, owner), **given(both, owner)) for owner in OWNERS))
        check_configs(cfgs)
    except ValueError as err:  # a config's own checks, or check_configs'
        parser.error(str(err))
    if cfgs.train.data not in data.DATASETS:
        parser.error(f"--data must be one of {data.DATASETS}")
    return cfgs, args


class TrainingError(RuntimeError):
    """A run that cannot go on (a non-finite loss, a missing checkpoint); printed, no traceback."""


# ----------------------------------------------------------------------------------------------
# Data: the dataset and its descriptions


def prepare_data(train_cfg: TrainConfig) -> None:
    """The dataset and its identity/clothing descriptions must exist before training. SynthPEDES
    is made here when missing (data, then offline descriptions); a real benchmark is not."""
    described = data.descriptions_file(train_cfg.data, train_cfg.root)
    if train_cfg.data == "synth":
        outfits = synthpedes.SynthConfig(regime=train_cfg.synth_regime).outfits_per_id
        per_outfit = -(-train_cfg.synth_train_images // outfits) or None  # rounded up; 0: the default
        synthpedes.ensure_synthpedes(train_cfg.root, num_ids=train_cfg.synth_ids, regime=train_cfg.synth_regime,
                                     train_images_per_outfit=per_outfit)
        images = len(data.read_annotations("synth", train_cfg.root).records)
        if not described.exists() or len(data.read_descriptions(described)) < images:
            print(f"writing the missing SynthPEDES descriptions to {described} "
                  "(python describe.py: style clusters + the offline rules backend)", file=sys.stderr)
            import describe  # offline here: the rules backend calls no network
            describe.run(describe.DescribeConfig(data="synth", root=train_cfg.root))
        return
    data.read_annotations(train_cfg.data, train_cfg.root)  # a missing dataset says where the files go
    if not described.exists():
        raise data.DatasetError(
            f"{described} is missing: training needs the identity and clothing descriptions of every image "
            f"(paper Sec. III-B). Write them first with\n  OPENAI_API_KEY=... python describe.py --data "
            f"{train_cfg.data} --root {train_cfg.root} --backend openai --model gpt-4o-mini\nor offline, from "
            f"the captions alone: python describe.py --data {train_cfg.data} --root {train_cfg.root} --backend rules")


def load_splits(train_cfg: TrainConfig) -> tuple[data.ReIDData, data.ReIDData | None]:
    """The training and test splits, and the validation split or None where there is none
    (ICFG-PEDES, or a converted file with no "val" records: the last epoch is then best.pt, beta
    the config's or 0, as one line says). No test records is an error before training starts."""
    dataset = data.load_dataset(train_cfg.data, train_cfg.root)
    val = data.load_validation(train_cfg.data, train_cfg.root)
    file = data.annotation_file(train_cfg.data, train_cfg.root)
    if train_cfg.final_eval and not dataset.gallery:
        raise data.DatasetError(f'{file}: no "test" records, which the final evaluation needs: '
                                f'add them, or pass --final-eval false')
    if val is None and rank() == 0:
        print(f'{file}: no validation split (no "val" records): best.pt is the last epoch and the clothing '
              f'weight beta the config\'s or 0', file=sys.stderr)
    return dataset, val


# ----------------------------------------------------------------------------------------------
# The training state: what the steps share and what a checkpoint holds

CHECKPOINTED = ("model", "gradnorm", "optimizer", "weight_optimizer", "schedule")
COUNTERS = ("epoch", "step_in_epoch", "global_step", "best")


@dataclass
class State:
    cfgs: Configs
    device: torch.device
    model: T2IReID
    gradnorm: GradNorm
    optimizer: torch.optim.Optimizer  # the network: Adam, Sec. IV-A
    weight_optimizer: torch.optim.Optimizer  # the GradNorm task weights s_k
    schedule: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler | None = None  # --amp fp16 on a GPU (devices.grad_scaler)
    ddp: torch.nn.Module | None = None  # the model under DistributedDataParallel (torchrun)
    epoch: int = 0
    step_in_epoch: int = 0  # batches of `epoch` already trained on
    global_step: int = 0
    best: float = -1.0  # best validation Rank-1 so far

    @classmethod
    def create(cls, cfgs: Configs, device: torch.device, total_steps: int) -> "State":
        train_cfg, model_cfg, loss_cfg = cfgs.train, cfgs.model, cfgs.loss
        model = T2IReID(model_cfg).to(device)
        text_attention_for(model.text, torch.device(device))
        install_cpu_substitutes(model, torch.device(device))  # the speed substitutes of helpers/devices.py, on a CPU
        if train_cfg.grad_checkpoint:
            checkpoint_activations(model)
        gradnorm = GradNorm(loss_cfg.balanced_names(model_cfg.fusion_detach), alpha=loss_cfg.gradnorm_alpha,
                            reg_lambda=loss_cfg.weight_reg if loss_cfg.use_weight_reg else 0.0).to(device)
        pretrained = [enc for enc, name in ((model.vision, model_cfg.vision_model), (model.text, model_cfg.text_model))
                      if name]  # "" = built from its config with random weights
        slow = {id(p) for encoder in pretrained for p in encoder.parameters()}
        trained = [p for p in model.parameters() if p.requires_grad]  # not the frozen text layers
        groups = [{"params": [p for p in trained if id(p) not in slow], "lr": train_cfg.lr},
                  {"params": [p for p in trained if id(p) in slow], "lr": train_cfg.lr * train_cfg.pretrained_lr_scale}]
        # fused: one kernel for every parameter (4-5x faster than the per-tensor loop on a CPU)
        optimizer = torch.optim.Adam(groups, weight_decay=train_cfg.weight_decay,
                                     fused=torch.device(device).type in ("cpu", "cuda"))
        weight_optimizer = torch.optim.Adam(gradnorm.parameters(), lr=train_cfg.gradnorm_lr)

        def lr_factor(step):  # linear warm-up, then cosine annealing to 0 (Sec. IV-A)
            if step < train_cfg.warmup_steps:
                return (step + 1) / train_cfg.warmup_steps
            progress = (step - train_cfg.warmup_steps) / max(1, total_steps - train_cfg.warmup_steps)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
        return cls(cfgs, torch.device(device), model, gradnorm, optimizer, weight_optimizer, schedule,
                   grad_scaler(torch.device(device), train_cfg.amp))

    def parts(self) -> tuple[str, ...]:
        return CHECKPOINTED + ("scaler",) * bool(self.scaler)

    def state_dict(self) -> dict:
        """Everything a resumed run needs; under torchrun a collective (every process calls it)."""
        return {**{p: getattr(self, p).state_dict() for p in self.parts()}, **{c: getattr(self, c) for c in COUNTERS},
                **random_states(), "config": self.cfgs.as_dict()}

    def load_state_dict(self, saved: dict) -> None:
        for part in self.parts():
            getattr(self, part).load_state_dict(saved[part])
        for counter in COUNTERS:
            setattr(self, counter, saved[counter])
        restore_random_states(saved)


def checkpoint(state: State, path: Path) -> None:
    """last.pt: every process takes part (the RNGs), rank 0 writes."""
    saved = state.state_dict()
    if rank() == 0:
        save(saved, path)


def save_best(state: State, score: float | None, path: Path) -> None:
    """best.pt: the weights, their epoch and validation Rank-1, and the configuration (a model on its own)."""
    save({"model": state.model.state_dict(), "epoch": state.epoch, "val_R1": score, "config": state.cfgs.as_dict()},
         path)


# ----------------------------------------------------------------------------------------------
# One step


def train_step(state: State, batch: dict) -> dict:
    """Forward, the named losses over the global batch, one update: the log row."""
    batch = to_device(batch, state.device)
    with forward_context(state.device, state.cfgs.train.amp):
        out, labels = gather_batch((state.ddp or state.model)(batch), batch)  # the global batch
        losses = {name: loss.float() for name, loss in compute_losses(out, labels, state.cfgs.loss).items()}
    return {**update(state, losses), **gate_stats(out)}


def update(state: State, losses: dict[str, torch.Tensor]) -> dict:
    """GradNorm (Eq. 5) and the weighted total (Eq. 6), one optimiser step of the network and
    of the task weights: the log row (the losses, L_total, each w_k and each G_k)."""
    values = {name: loss.detach().item() for name, loss in losses.items()}
    if bad := {name: value for name, value in values.items() if not math.isfinite(value)}:
        raise TrainingError(f"loss {', '.join(f'{k} = {v}' for k, v in bad.items())} at step "
                            f"{state.global_step + 1} (epoch {state.epoch + 1}); lower --lr or turn "
                            f"--amp off{not_float32(state.model)}; last.pt still holds the last good state")
    shared, balanced = state.model.shared_parameter(), state.cfgs.loss.use_gradnorm
    # fp16: every backward runs on the losses times the GradScaler's factor (1 otherwise)
    scale = state.scaler.scale(torch.ones((), device=shared.device)).squeeze() if state.scaler else 1.0
    if balanced:
        stats = state.gradnorm.backward(losses, shared, mean_over_processes if world() > 1 else None, scale)
    else:  # every weight stays 1
        stats = {"total": sum(losses.values())}
        (stats["total"] * scale).backward()
    optimizer_step(state.optimizer, state.scaler)
    state.schedule.step()
    state.optimizer.zero_grad(set_to_none=True)
    if balanced:
        state.weight_optimizer.step()
    state.weight_optimizer.zero_grad(set_to_none=True)
    norms = stats["grad_norms"].tolist() if "grad_norms" in stats else []  # G_k of Eq. 5
    return {**values, "total": stats["total"].detach().item(),
            **{f"w_{task}": w for task, w in zip(state.gradnorm.tasks, state.gradnorm.weights().tolist())},
            **{f"G_{task}": g for task, g in zip(state.gradnorm.tasks, norms)}}


# ----------------------------------------------------------------------------------------------
# The run


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise TrainingError("--device cuda, but torch sees no GPU; use --device cpu")
    return torch.device(name)


def setup(cfgs: Configs, run: Path | None):
    """Data, model and optimisers, the run folder, and (resuming) the last checkpoint. Under
    torchrun every process runs this; rank 0 alone prepares the data and writes the folder."""
    train_cfg, model_cfg = cfgs.train, cfgs.model
    device = init_distributed(pick_device(train_cfg.device))
    if rank() == 0:
        prepare_data(train_cfg)
    if world() > 1:
        dist.barrier()  # the data rank 0 may have just written
    dataset, val = load_splits(train_cfg)
    tokenizer = load_tokenizer(model_cfg.text_model or None)  # "" = random BERT, same vocabulary
    torch.manual_seed(train_cfg.seed), np.random.seed(train_cfg.seed), random.seed(train_cfg.seed)
    try:
        sampler = data.IdentitySampler([s.pid for s in dataset.train], train_cfg.p, train_cfg.k, seed=train_cfg.seed,
                                       rank=rank(), world=world())
    except ValueError as err:  # too few identities, or P not a multiple of the processes
        raise TrainingError(str(err)) from None
    state = State.create(cfgs, device, total_steps=train_cfg.epochs * len(sampler))
    if rank() > 0:  # dropout masks of its own; rank 0 draws what one process would
        torch.manual_seed(train_cfg.seed * 1_000_003 + rank())
    run, resume = from_rank0(start_run(cfgs.train, cfgs.as_dict(), run) if rank() == 0 else None)
    if resume:
        state.load_state_dict(torch.load(run / "last.pt", map_location=device, weights_only=False))
        if rank() == 0:
            trim_log(run / "log.jsonl", state.global_step)
            print(f"resuming {run} at epoch {state.epoch + 1}, step {state.global_step}", file=sys.stderr)
    if world() > 1:  # frozen parameters (requires_grad False) are left out by DDP itself
        state.ddp = torch.nn.parallel.DistributedDataParallel(
            state.model, device_ids=[device] if device.type == "cuda" else None)
    items = training_items(dataset, train_cfg, model_cfg)
    fill_text_cache(state.model, items.dataset.texts(), tokenizer, model_cfg.max_text_len, device)
    return state, run, dataset, val, tokenizer, sampler, items


def train(cfgs: Configs, run: Path | None = None) -> Path:
    """Train (or resume `run`): for each batch forward, losses, backward, step, log; after each
    epoch validate and keep last.pt / best.pt; at the end evaluate best.pt on the test split."""
    state, run, dataset, val, tokenizer, sampler, items = setup(cfgs, run)
    train_cfg, max_len = cfgs.train, cfgs.model.max_text_len
    state.model.train()
    with open(run / "log.jsonl" if rank() == 0 else os.devnull, "a") as log, StopRequest() as stop:
        while state.epoch < train_cfg.epochs:
            loader = make_loader(items, sampler, state.epoch, state.step_in_epoch, tokenizer, train_cfg, max_len,
                                 state.device)
            bar = tqdm(loader, desc=f"epoch {state.epoch + 1}/{train_cfg.epochs}", dynamic_ncols=True,
                       initial=state.step_in_epoch, total=state.step_in_epoch + len(loader), disable=rank() > 0)
            tick, stopped = time.perf_counter(), False
            for batch in bar:
                row = train_step(state, batch)
                state.step_in_epoch, state.global_step = state.step_in_epoch + 1, state.global_step + 1
                now = time.perf_counter()
                row.update(step=state.global_step, epoch=state.epoch, lr=state.schedule.get_last_lr()[0],
                           images_per_s=len(batch["pids"]) * world() / (now - tick))
                tick = now
                log.write(json.dumps(row) + "\n")
                log.flush()
                bar.set_postfix(loss=f"{row['total']:.3f}", img_s=f"{row['images_per_s']:.1f}")
                if state.global_step % train_cfg.checkpoint_every == 0:
                    checkpoint(state, run / "last.pt")
                stop.requested = any_process(stop.requested, state.device)
                if stopped := stop.requested or bool(train_cfg.max_steps and state.global_step >= train_cfg.max_steps):
                    break
            if not stopped:  # the epoch ran to its end: validate, keep best.pt
                state.epoch, state.step_in_epoch = state.epoch + 1, 0
                if rank() == 0:
                    end_epoch(state, val, tokenizer, run, log)
            checkpoint(state, run / "last.pt")
            if stopped:
                break
    return finish(state, run, dataset, val, tokenizer, stop)


def end_epoch(state: State, val, tokenizer, run: Path, log) -> None:
    """After each epoch (rank 0): the validation Rank-1 in the log, best.pt when it improved."""
    score = None
    if val is not None:  # model selection on the validation split: stage 1's Rank-1
        model_cfg = state.cfgs.model
        score = evaluate.evaluate_model(state.model, val, tokenizer, model_cfg.image_size, model_cfg.max_text_len,
                                        state.device, state.cfgs.train.eval_batch, rerank_k=0, robustness=False,
                                        progress=False)["stage1"]["R1"]
        state.model.train()
    log.write(json.dumps({"step": state.global_step, "epoch": state.epoch, "val_R1": score}) + "\n")
    if score is None or score > state.best:  # no validation split: the last epoch is the best
        state.best = state.best if score is None else score
        save_best(state, score, run / "best.pt")


def finish(state: State, run: Path, dataset, val, tokenizer, stop: StopRequest) -> Path:
    """After the loop: a stopped run says how to resume; a finished one draws its curves and
    evaluates best.pt on the test split (evaluate.evaluate_and_save: results.json)."""
    if stop.requested:  # a signal, not max_steps
        again = "python train.py" if world() == 1 else "the same torchrun command with train.py"
        raise KeyboardInterrupt(f"stopped at step {state.global_step}; continue with: {again} --resume {run}")
    if rank() > 0:
        return run
    if picture := training_picture(read_log(run / "log.jsonl"), run / "training_curves.png"):
        print(f"wrote {picture}")
    if not (run / "best.pt").exists():  # stopped by max_steps before the first epoch ended
        save_best(state, None, run / "best.pt")
    if state.cfgs.train.final_eval:
        state.model.load_state_dict(torch.load(run / "best.pt", map_location=state.device, weights_only=False)["model"])
        evaluate.evaluate_and_save(state.model, dataset, val, tokenizer, state.cfgs.retrieval, state.device, run,
                                   state.cfgs.train.eval_batch, state.cfgs.train.seed)
    return run


def main(argv=None) -> int:
    cfgs, args = parse_config(argv)
    keep_freed_memory()
    try:
        train(cfgs, Path(args.resume) if args.resume else None)
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
