"""train.py end to end on a small SynthPEDES: it learns (beats chance by a margin), it resumes
exactly, it survives Ctrl-C, two processes (DistributedDataParallel, gloo) compute what one
process computes, and bad runs stop with clear messages."""
import dataclasses
import itertools
import json
import math
import os
import random
import signal
import socket
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from transformers import BertConfig, BertModel, ViTConfig, ViTModel

import data
from helpers import devices
import evaluate
import mamba_triton
from synthetic import synthpedes
import train
from helpers.batches import fill_text_cache, loader_workers, make_loader, training_items
from helpers.devices import forward_context
from helpers.encoders import load_tokenizer
from helpers.reports import gate_stats
from helpers.runs import start_run
from losses import compute_losses
from model import T2IReID
from helpers.pictures import read_log, training_figure

# A model small enough to train in seconds on a CPU: 2-layer ViT on 64 x 32 images (P = 8), the
# pretrained all-MiniLM-L6-v2 text encoder (real words carry meaning from the first step).
TINY = ["--image-size", "64,32", "--vision-layers", "2", "--vision-width", "64", "--vision-heads", "2",
        "--bdam-width", "64", "--bdam-heads", "2", "--fusion-width", "32", "--embed-dim", "32",
        "--rerank-k", "8", "--eval-batch", "64", "--workers", "0"]
# 30 identities, 6 photographs of each training outfit (the preset takes 12)
SYNTH = ["--synth-ids", "30", "--synth-train-images", "18"]


@pytest.fixture(autouse=True)
def scan_reference(monkeypatch):
    """The PyTorch selective scan in this process: the kernels are tested in test_mamba_triton.py."""
    monkeypatch.setattr(mamba_triton, "_INTERPRET", False)


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory):
    """30 identities (18 train / 3 val / 9 test), their descriptions written by train.py itself."""
    root = tmp_path_factory.mktemp("synth")
    cfgs, _ = train.parse_config(["--root", str(root), *SYNTH])
    train.prepare_data(cfgs.train)
    return root


def config(root, *extra) -> train.Configs:
    """The configs of the command line, as train.train takes them."""
    cfgs, _ = train.parse_config(["--root", str(root), *SYNTH, *TINY, *extra])
    return cfgs


def test_training_retrieves_held_out_people_far_above_chance(tmp_path_factory, tmp_path, monkeypatch):
    """The pipeline learns what generalises: the SynthPEDES preset's model, trained for 136 steps
    (2 epochs of the default dataset, two photographs per outfit), ranks the test split's 90
    identities -- never seen in training -- far above chance with their captions, in both
    stages. Misaligned image-text pairs, a detached branch, an evaluation path that disagrees
    with training, or a model that only memorises its training images all fail it. About three
    minutes on two CPU cores; on this machine it reached R1 6.3 and mAP 7.2 (stage 2 mAP 7.3)
    where chance is 1.1 (2026-11-28)."""
    monkeypatch.chdir(tmp_path)
    root = tmp_path_factory.mktemp("synth300")
    cfgs, _ = train.parse_config(["--root", str(root), "--synth-train-images", "0", "--epochs", "2",
                                  "--final-eval", "false"])
    run = train.train(cfgs)
    mcfg = cfgs.model
    model = T2IReID(mcfg)
    model.load_state_dict(torch.load(run / "best.pt", weights_only=False)["model"])
    test = data.load_dataset("synth", root)
    result = evaluate.evaluate_model(model, test, load_tokenizer(mcfg.text_model), mcfg.image_size,
                                     mcfg.max_text_len, torch.device("cpu"), robustness=False, progress=False)
    gallery = [g.pid for g in test.gallery]
    train_ids = {r["id"] for r in data.read_annotations("synth", root).records if r["split"] == "train"}
    assert len(set(gallery)) == 90 and not set(gallery) & train_ids
    # a random ranking puts a positive first with probability (#positives / #gallery): about 1.1%
    chance_r1 = 100 * sum(gallery.count(q.pid) / len(gallery) for q in test.queries) / len(test.queries)
    assert result["stage1"]["R1"] > 3 * chance_r1, (result["stage1"], chance_r1)
    assert result["stage1"]["mAP"] > 2.5 * chance_r1, (result["stage1"], chance_r1)
    assert result["stage2"]["mAP"] > 2.5 * chance_r1, (result["stage2"], chance_r1)
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    steps = [row for row in log if "total" in row]
    assert len(steps) == 136 and steps[-1]["total"] < steps[0]["total"]
    # GradNorm's weights stay inside the regulariser's bound, and each step logs w_k and G_k
    assert all(0.2 <= row[f"w_{t}"] <= 5 and row[f"G_{t}"] >= 0 for row in steps
               for t in cfgs.loss.balanced_names(mcfg.fusion_detach))
    assert all(0 < row["w_img"] < 1 and row["g_std"] > 0 for row in steps)  # both gates logged
    assert (Path("runs") / "latest").resolve() == run.resolve()
    assert {"last.pt", "best.pt", "config.json"} <= {p.name for p in run.iterdir()}


def test_gate_stats_by_hand():
    """g_std: per-channel std over the images, averaged over channels; w_img: the mean W_img."""
    g = torch.tensor([[0.2, 0.4], [0.6, 0.4]])  # channel 0 varies (std 0.2828), channel 1 does not
    stats = gate_stats({"bdam_gate": g, "fusion_gate": torch.tensor([[0.1, 0.3], [0.5, 0.7]])})
    assert stats["g_std"] == pytest.approx((0.4 / 2 ** 0.5) / 2) and stats["w_img"] == pytest.approx(0.4)
    assert gate_stats({"bdam_gate": None, "fusion_gate": None}) == {}  # w/o BDAM gate, w/o fusion


def test_random_erasing_reaches_the_training_images_as_the_run_asks(synth_root):
    """--erase-p is what train() trains on: with 1, each image differs from the one with 0 (the
    same seed, so the same flip and crop) in one rectangle, and is 0 throughout it."""
    dataset = data.load_dataset("synth", synth_root)
    plain, erased = (training_items(dataset, cfgs.train, cfgs.model)
                     for cfgs in (config(synth_root, "--erase-p", "0"), config(synth_root, "--erase-p", "1")))
    for i in range(4):
        a, b = plain[(0, i)]["image"], erased[(0, i)]["image"]  # (3, H, W)
        rows, cols = (a != b).any(0).nonzero(as_tuple=True)
        assert len(rows) > 0
        box = b[:, rows.min():rows.max() + 1, cols.min():cols.max() + 1]
        assert (box == 0).all() and box[0].numel() < 0.5 * a[0].numel()  # erase_scale tops at 0.4


def test_final_evaluation_writes_both_stages_and_robustness(synth_root, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = train.train(config(synth_root, "--p", "4", "--k", "2", "--max-steps", "2"))
    results = json.loads((run / "results.json").read_text())
    assert results["num_queries"] == len(data.load_dataset("synth", synth_root).queries)
    for protocol in ("table_v_as_shipped", "table_v_whole_text"):  # Table V in both protocols
        assert set(results[protocol]) == {"Standard", "Identity-Only", "Clothes-Conflict"}
    for stage in ("stage1", "stage2"):  # SynthPEDES knows the outfits: the cross-outfit numbers come too
        for m in (results[stage], results[stage]["cross_outfit"],
                  results["table_v_as_shipped"]["Standard"][stage]["cross_outfit"]):
            assert all(0 <= m[c] <= 100 for c in ("R1", "R5", "R10", "mAP", "mINP"))
    # the fusion weight a chosen on the validation split after beta, at the K that TINY fixes
    tried = {(row["rerank_k"], row["fusion_weight"]) for row in results["rerank_sweep"]}
    assert tried == {(8, a) for a in evaluate.FUSION_WEIGHTS}
    assert (results["rerank_k"], results["fusion_weight"]) in tried
    # beta chosen on the validation split (one row per beta tried); evaluate.py reads the three
    # settings from results.json beside best.pt, which nothing rewrites
    betas = [row["clothing_weight"] for row in results["clothing_weight_sweep"]]
    assert betas == list(evaluate.CLOTHING_WEIGHTS) and results["clothing_weight"] in betas
    assert set(torch.load(run / "best.pt", weights_only=False)) == {"model", "epoch", "val_R1", "config"}
    assert evaluate.load_run(run).settings == evaluate.RetrievalConfig(
        results["clothing_weight"], results["rerank_k"], results["fusion_weight"])
    # training at a glance: a line for each task's loss, written by train.py itself
    tasks = config(synth_root).loss.loss_names()
    assert [line.get_label() for line in training_figure(read_log(run / "log.jsonl")).axes[0].get_lines()] == tasks
    assert (run / "training_curves.png").is_file()


def test_loader_workers_from_the_cores(monkeypatch):
    from helpers import batches
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(batches.os, "cpu_count", lambda: 16)
    assert loader_workers(3, cpu) == 3  # as given
    assert loader_workers(-1, cpu) == 0  # a CPU run: the cores train
    monkeypatch.setattr(train.torch.cuda, "is_available", lambda: True)
    assert loader_workers(-1, cuda) == 8 and loader_workers(-1, train.pick_device("auto")) == 8
    monkeypatch.setattr(batches.os, "cpu_count", lambda: 4)
    assert loader_workers(-1, cuda) == 3


def test_resume_continues_exactly(synth_root, tmp_path, monkeypatch):
    """4 steps straight == 2 steps, stop, resume, 2 more: same weights, same log."""
    monkeypatch.chdir(tmp_path)
    base = ["--epochs", "2", "--p", "4", "--k", "2", "--final-eval", "false", "--checkpoint-every", "1"]
    straight = train.train(config(synth_root, *base, "--max-steps", "5", "--name", "straight"))
    halves = train.train(config(synth_root, *base, "--max-steps", "2", "--name", "halves"))
    train.train(config(synth_root, *base, "--max-steps", "5", "--name", "halves"), run=halves)
    a = torch.load(straight / "last.pt", weights_only=False)
    b = torch.load(halves / "last.pt", weights_only=False)
    assert a["global_step"] == b["global_step"] == 5
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    assert torch.equal(a["gradnorm"]["log_weights"], b["gradnorm"]["log_weights"])
    losses = lambda run: [row["total"] for row in map(json.loads, (run / "log.jsonl").read_text().splitlines())
                          if "total" in row]  # noqa: E731
    assert losses(straight) == losses(halves)


# Two processes on the CPU, as torchrun starts them (gloo), against one process that computes
# the same thing. A random 2-layer text encoder (the bottom layer frozen and cached) keeps each
# process's start-up short; dropout, the BNNeck's batch statistics and GradNorm stay on.
DDP = [*TINY, "--text-model", "", "--text-layers", "2", "--text-width", "32", "--text-heads", "2",
       "--text-frozen-layers", "1", "--p", "4", "--k", "2", "--epochs", "1", "--checkpoint-every", "1",
       "--final-eval", "false", "--amp", "false"]  # fp32, for the tolerances below


def ddp_worker(rank: int, port: int, root: str, runs: list) -> None:
    """Process `rank` of 2: the environment torchrun gives it, then train.train for each
    (name, max_steps, resume) of `runs`; after every step it also keeps its own parameters and
    GradNorm weights (ranks/NAME-rRANK-sSTEP.pt), to show they are the same in both processes."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2")
    mamba_triton._INTERPRET = False  # the PyTorch selective scan, as in this file's other tests
    write_last = train.checkpoint

    def checkpoint(state, path):
        write_last(state, path)
        params = {name: p.detach().clone() for name, p in state.model.named_parameters()}
        torch.save({"params": params, "log_weights": state.gradnorm.log_weights.detach().clone()},
                   Path("ranks") / f"{path.parent.name}-r{rank}-s{state.global_step}.pt")

    train.checkpoint = checkpoint
    for name, steps, resume in runs:
        cfgs, _ = train.parse_config(["--root", root, *SYNTH, *DDP, "--name", name, "--max-steps", str(steps)])
        train.train(cfgs, Path("runs") / name if resume else None)


def run_two_processes(root: Path, runs: list, timeout: float = 240) -> None:
    """ddp_worker in 2 spawned processes; a hang (a collective one process never reaches) fails."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    Path("ranks").mkdir()
    context = mp.start_processes(ddp_worker, args=(port, str(root), runs), nprocs=2, join=False,
                                 start_method="spawn")
    deadline = time.time() + timeout
    while not context.join(timeout=1):
        if time.time() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the two processes did not finish in {timeout} s")


def chunked_forward(model, chunks: list, rngs: list, loss_cfg) -> tuple[dict, dict]:
    """What the two processes compute, in one: each chunk (a process's P/N identities) through the
    model with that process's dropout RNG, the outputs and labels concatenated in rank order, the
    losses over the concatenation. Returns (losses, rank 0's buffers): DDP broadcasts rank 0's
    buffers before every forward, so the batch-norm running statistics are those of its chunks."""
    outs, rank0_buffers = [], None
    for r, chunk in enumerate(chunks):
        torch.set_rng_state(rngs[r])
        with forward_context(torch.device("cpu"), amp="off"):  # as train_step runs it (DDP's --amp false)
            outs.append(model(chunk))
        rngs[r] = torch.get_rng_state()
        rank0_buffers = rank0_buffers or {name: b.clone() for name, b in model.named_buffers()}
    out = {k: torch.cat([o[k] for o in outs]) if torch.is_tensor(v) else v for k, v in outs[0].items()}
    length = max(c["clothing"]["input_ids"].shape[1] for c in chunks)
    ids = [F.pad(c["clothing"]["input_ids"], (0, length - c["clothing"]["input_ids"].shape[1])) for c in chunks]
    labels = {"pids": torch.cat([c["pids"] for c in chunks]), "clothing": {"input_ids": torch.cat(ids)}}
    return compute_losses(out, labels, loss_cfg), rank0_buffers


def one_process_reference(root: Path, steps: int):
    """train.train's set-up, then `steps` updates on the concatenated chunks: (state, log rows)."""
    cfgs = config(root, *DDP)
    cfg, mcfg = cfgs.train, cfgs.model
    assert cfg.amp == "off"  # fp32, as the two processes run
    dataset, tokenizer, cpu = data.load_dataset("synth", root), load_tokenizer(None), torch.device("cpu")
    torch.manual_seed(cfg.seed), np.random.seed(cfg.seed), random.seed(cfg.seed)
    samplers = [data.IdentitySampler([s.pid for s in dataset.train], cfg.p, cfg.k, seed=cfg.seed, rank=r, world=2)
                for r in range(2)]
    state = train.State.create(cfgs, cpu, total_steps=cfg.epochs * len(samplers[0]))
    rngs = [torch.get_rng_state(), torch.manual_seed(cfg.seed * 1_000_003 + 1).get_state()]  # as train.setup
    items = training_items(dataset, cfg, mcfg)
    fill_text_cache(state.model, items.dataset.texts(), tokenizer, mcfg.max_text_len, cpu)
    state.model.train()
    loaders = [make_loader(items, sampler, 0, 0, tokenizer, cfg, mcfg.max_text_len, cpu) for sampler in samplers]
    rows = []
    for chunks in itertools.islice(zip(*loaders), steps):
        losses, rank0_buffers = chunked_forward(state.model, chunks, rngs, cfgs.loss)
        rows.append(train.update(state, losses))
        state.model.load_state_dict(rank0_buffers, strict=False)  # after the backward that used them
    return state, rows


def noise_driven(state, steps: int) -> dict:
    """{parameter name: bool mask} of the entries whose gradient is rounding noise, RMS below 1e-6
    by Adam's second moment: the attention key biases, whose exact gradient is 0 (softmax ignores
    a constant added to all of a query's logits). Adam turns that noise into steps of up to lr,
    unlike in two runs that add the same numbers in another order."""
    beta2 = state.optimizer.defaults["betas"][1]
    return {name: (s["exp_avg_sq"] / (1 - beta2 ** steps)).sqrt() < 1e-6
            for name, p in state.model.named_parameters() if (s := state.optimizer.state.get(p))}


def test_two_processes_match_one_process_computing_the_same_thing(synth_root, tmp_path, monkeypatch):
    """torchrun's set-up with 2 gloo processes on the CPU, 3 steps of train.train: the logged
    losses and GradNorm weights of every step, and the weights and buffers of last.pt, equal
    those of one process that runs each process's P/N identities through the model with that
    process's dropout RNG and takes every loss over the global batch (InfoNCE negatives, the
    triplet's hardest pairs and HSIC see both halves; the fusion's hard negatives and the
    BNNeck's statistics are each process's own). Tolerance 1e-5 (fp32; measured: losses 4e-6 of
    about 9, GradNorm weights 1e-8, network weights 1e-8), except weights whose gradient is
    rounding noise (noise_driven): 3 Adam steps, 3 * lr (measured 7e-5). Every process holds the same parameters
    and GradNorm weights after every step, bit for bit. A run stopped after 2 steps and resumed
    under DDP ends as the straight run does, bit for bit (each process's RNG restored). About
    40 s on one CPU core."""
    monkeypatch.chdir(tmp_path)
    run_two_processes(synth_root, [("straight", 3, False), ("halves", 2, False), ("halves", 3, True)])
    reference, rows = one_process_reference(synth_root, steps=3)
    logged = [json.loads(line) for line in (tmp_path / "runs" / "straight" / "log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in logged] == [1, 2, 3]  # rank 0 alone writes the log
    for mine, theirs in zip(rows, logged):
        for key, value in mine.items():
            assert theirs[key] == pytest.approx(value, rel=1e-5, abs=1e-5), (theirs["step"], key)
    saved = torch.load(tmp_path / "runs" / "straight" / "last.pt", weights_only=False)
    noise, lr = noise_driven(reference, steps=3), config(synth_root).train.lr
    for name, tensor in reference.model.state_dict().items():
        mask = noise.get(name, torch.zeros_like(tensor, dtype=torch.bool))
        torch.testing.assert_close(saved["model"][name][~mask], tensor[~mask], rtol=1e-5, atol=1e-5, msg=name)
        torch.testing.assert_close(saved["model"][name][mask], tensor[mask], rtol=0, atol=3 * lr, msg=name)
    torch.testing.assert_close(saved["gradnorm"]["log_weights"], reference.gradnorm.log_weights.detach(),
                               rtol=1e-5, atol=1e-5)
    assert len(saved["rng_ranks"]) == 2 and not torch.equal(*(r["torch"] for r in saved["rng_ranks"]))
    for step in (1, 2, 3):
        ranks = [torch.load(tmp_path / "ranks" / f"straight-r{r}-s{step}.pt") for r in range(2)]
        assert torch.equal(ranks[0]["log_weights"], ranks[1]["log_weights"]), step
        assert all(torch.equal(p, ranks[1]["params"][name]) for name, p in ranks[0]["params"].items()), step
    resumed = torch.load(tmp_path / "runs" / "halves" / "last.pt", weights_only=False)
    assert resumed["global_step"] == 3
    assert all(torch.equal(t, resumed["model"][name]) for name, t in saved["model"].items())
    assert torch.equal(saved["gradnorm"]["log_weights"], resumed["gradnorm"]["log_weights"])
    losses = lambda run: [row["total"] for row in map(json.loads, (tmp_path / "runs" / run / "log.jsonl")
                                                      .read_text().splitlines())]  # noqa: E731
    assert losses("halves") == losses("straight")


def test_ctrl_c_saves_last_and_resume_finishes(synth_root, tmp_path):
    """A real process, a real SIGINT: exit 130, last.pt written, then --resume runs to the end."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    args = [sys.executable, str(Path(train.__file__)), "--root", str(synth_root), *SYNTH,
            *TINY, "--epochs", "1", "--p", "4", "--k", "2", "--final-eval", "false", "--name", "stopped"]
    proc = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = tmp_path / "runs" / "stopped" / "log.jsonl"
    deadline = time.time() + 240
    while not (log.exists() and log.read_text().count("\n") >= 2) and time.time() < deadline:
        time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "python train.py --resume runs/stopped" in err
    saved = torch.load(tmp_path / "runs" / "stopped" / "last.pt", weights_only=False)
    assert saved["global_step"] >= 2 and saved["epoch"] == 0
    done = subprocess.run([sys.executable, str(Path(train.__file__)), "--resume", "runs/stopped"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert torch.load(tmp_path / "runs" / "stopped" / "last.pt", weights_only=False)["epoch"] == 1


def test_sigterm_to_the_group_with_workers_stops_quietly(synth_root, tmp_path):
    """SIGTERM to the whole process group (as `timeout` or a scheduler sends it) of a run with two
    loader workers, mid-epoch: last.pt saved, the one resume line, exit 130, no traceback -- the
    workers, in groups of their own, do not die of the signal and are shut down by the run."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    args = [sys.executable, str(Path(train.__file__)), "--root", str(synth_root), *SYNTH, *TINY,
            "--workers", "2", "--epochs", "1", "--p", "4", "--k", "2", "--final-eval", "false",
            "--name", "termed"]
    proc = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    log = tmp_path / "runs" / "termed" / "log.jsonl"
    deadline = time.time() + 240
    while not (log.exists() and log.read_text().count("\n") >= 2) and time.time() < deadline:
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "killed by signal" not in err, err
    assert "continue with: python train.py --resume runs/termed" in err
    saved = torch.load(tmp_path / "runs" / "termed" / "last.pt", weights_only=False)
    assert saved["global_step"] >= 2 and saved["epoch"] == 0


def test_non_finite_loss_stops_with_the_loss_named(synth_root, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    real = train.compute_losses

    def broken(out, batch, cfg):
        losses = real(out, batch, cfg)
        return {**losses, "triplet": losses["triplet"] * float("nan")}

    monkeypatch.setattr(train, "compute_losses", broken)
    with pytest.raises(train.TrainingError, match=r"loss triplet = nan at step 1 \(epoch 1\); lower --lr or "
                                                  r"turn --amp off; last.pt"):  # float32: no dtype named
        train.train(config(synth_root, "--p", "4", "--k", "2", "--max-steps", "1"))


def half_precision_encoders(folder: Path) -> tuple[Path, Path]:
    """A one-layer BERT (with the offline tokenizer beside it) and a one-layer ViT on 32 x 32
    images, saved in float16 as many hub checkpoints are: (vit folder, bert folder)."""
    tokenizer = load_tokenizer()
    small = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    bert = BertModel(BertConfig(vocab_size=len(tokenizer), **small), add_pooling_layer=False)
    vit = ViTModel(ViTConfig(image_size=32, patch_size=16, **small), add_pooling_layer=False)
    for model, name in ((vit, "vit"), (bert, "bert")):
        model.half().save_pretrained(folder / name)
    tokenizer.save_pretrained(folder / "bert")
    return folder / "vit", folder / "bert"


def test_half_precision_checkpoints_load_in_float32_and_train_under_autocast(synth_root, tmp_path, monkeypatch):
    """Encoders saved in float16 load in float32 (transformers 5 keeps a checkpoint's dtype
    unless told): Adam on fp16 weights under bf16 autocast turned the text tower to NaN at step 2
    on an H200 (docs/design.md#the-pretrained-encoders). One step under bf16 autocast on the CPU stays finite."""
    vit, bert = half_precision_encoders(tmp_path)
    cfgs = config(synth_root, "--vision-model", str(vit), "--text-model", str(bert),
                  "--image-size", "32,32", "--conv-stem", "false", "--text-frozen-layers", "0", "--p", "4", "--k", "2")
    cfg, mcfg, cpu = cfgs.train, cfgs.model, torch.device("cpu")
    assert cfg.amp == "bf16"  # the preset's: train_step runs under bf16 autocast
    state = train.State.create(cfgs, cpu, total_steps=2)
    dtypes = {name: p.dtype for name, p in state.model.named_parameters() if p.dtype != torch.float32}
    assert not dtypes, dtypes
    assert state.model.text.embeddings.word_embeddings.weight.shape[1] == 32  # the saved BERT, not another
    monkeypatch.setattr(devices, "cpu_has_bf16", lambda: True)  # bf16 autocast, as on a GPU
    items = training_items(data.load_dataset("synth", synth_root), cfg, mcfg)
    sampler = data.IdentitySampler([s.pid for s in items.dataset.samples], cfg.p, cfg.k, seed=0)
    tokenizer = load_tokenizer(str(bert))
    for batch in itertools.islice(make_loader(items, sampler, 0, 0, tokenizer, cfg, mcfg.max_text_len, cpu), 2):
        row = train.train_step(state, batch)
        assert all(math.isfinite(row[name]) for name in cfgs.loss.loss_names()), row
    assert all(torch.isfinite(p).all() for p in state.model.parameters())


def test_non_finite_loss_names_half_precision_parameters():
    """The error of a non-finite loss names the parameters that are not float32, the usual cause."""
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    model[0].half()
    state = types.SimpleNamespace(model=model, global_step=4, epoch=0)
    with pytest.raises(train.TrainingError, match=r"loss info = nan at step 5 .*float16 parameters "
                                                  r"\(2 tensors\): 0\.weight, 0\.bias"):
        train.update(state, {"info": torch.tensor(float("nan"))})


def test_real_benchmark_without_descriptions_names_the_describe_command(tmp_path):
    folder = tmp_path / "CUHK-PEDES"
    (folder / "imgs").mkdir(parents=True)
    (folder / "reid_raw.json").write_text(json.dumps([{"split": "train", "captions": ["a man"],
                                                        "file_path": "a.jpg", "processed_tokens": [["a", "man"]],
                                                        "id": 1}]))
    cfgs, _ = train.parse_config(["--data", "cuhk", "--root", str(tmp_path)])
    with pytest.raises(data.DatasetError, match="python describe.py --data cuhk"):
        train.prepare_data(cfgs.train)


# The real benchmarks' presets with tiny encoders built from their configs (no hub)
CUHK_TINY = [*TINY, "--data", "cuhk", "--vision-model", "", "--text-model", "", "--text-layers", "1",
             "--text-width", "32", "--text-heads", "2", "--p", "4", "--k", "2"]


def converted_cuhk(synth_root: Path, root: Path, splits: tuple) -> Path:
    """SynthPEDES's records of `splits` as a researcher's CUHK-PEDES conversion: reid_raw.json with
    CUHK-PEDES's fields only, the images and descriptions.jsonl beside it. Returns the file."""
    source, folder = synth_root / "SynthPEDES", root / "CUHK-PEDES"
    folder.mkdir(parents=True)
    (folder / "imgs").symlink_to(source / "imgs", target_is_directory=True)
    (folder / "descriptions.jsonl").write_text((source / "descriptions.jsonl").read_text())
    keep = ("split", "captions", "file_path", "processed_tokens", "id")
    records = [{key: r[key] for key in keep} for r in json.loads((source / "reid_raw.json").read_text())
               if r["split"] in splits]
    (folder / "reid_raw.json").write_text(json.dumps(records))
    return folder / "reid_raw.json"


def test_a_dataset_without_val_records_trains_as_icfg_pedes_does(synth_root, tmp_path, monkeypatch, capsys):
    """A CUHK-PEDES-format file with train and test records but no "val": one line at the start
    says so, the last epoch is best.pt, beta is 0, and the final evaluation is written (it once
    died there, in the clothing weight's sweep over an empty validation split)."""
    monkeypatch.chdir(tmp_path)
    annotations = converted_cuhk(synth_root, tmp_path / "data", ("train", "test"))
    assert train.main(["--root", str(tmp_path / "data"), *CUHK_TINY, "--max-steps", "3", "--name", "noval"]) == 0
    err = capsys.readouterr().err
    assert f"{annotations}: no validation split (no \"val\" records)" in err and "Traceback" not in err
    results = json.loads((tmp_path / "runs" / "noval" / "results.json").read_text())
    assert results["clothing_weight"] == 0.0 and results["clothing_weight_sweep"] is None
    assert results["num_gallery"] == 54


def test_a_dataset_without_test_records_is_refused_before_training(synth_root, tmp_path, monkeypatch, capsys):
    """No "test" records: one line naming the file and the fix, before any run folder is made."""
    monkeypatch.chdir(tmp_path)
    annotations = converted_cuhk(synth_root, tmp_path / "data", ("train", "val"))
    assert train.main(["--root", str(tmp_path / "data"), *CUHK_TINY, "--max-steps", "3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"train.py: error: {annotations}: no \"test\" records") and "--final-eval false" in err
    assert len(err.splitlines()) == 1 and not (tmp_path / "runs").exists()  # refused before the run began


def test_evaluate_reads_a_checkpoint_alone_with_the_configuration_it_carries(synth_root, tmp_path, monkeypatch,
                                                                           capsys):
    """best.pt and last.pt carry config.json's dict: `evaluate.py --checkpoint runs/NAME/best.pt`
    prints what `--run runs/NAME` prints, and the file copied alone elsewhere gives the same metrics."""
    monkeypatch.chdir(tmp_path)
    argv = ["--root", str(synth_root), *SYNTH, *TINY, "--p", "4", "--k", "2", "--max-steps", "2"]
    assert train.main([*argv, "--name", "ckpt", "--final-eval", "false"]) == 0
    run = tmp_path / "runs" / "ckpt"
    config = json.loads((run / "config.json").read_text())
    assert all(torch.load(run / name, weights_only=False)["config"] == config for name in ("best.pt", "last.pt"))
    capsys.readouterr()
    quick = ["--device", "cpu", "--limit-queries", "8", "--rerank-k", "3"]
    printed, metrics = {}, {}
    for how, where in (("--run", run), ("--checkpoint", run / "best.pt")):
        assert evaluate.main([how, str(where), *quick]) == 0
        printed[how], metrics[how] = capsys.readouterr().out, json.loads((run / "metrics.json").read_text())
    assert printed["--run"] == printed["--checkpoint"] and "stage 1 (dual encoder)" in printed["--run"]
    assert metrics["--run"] == metrics["--checkpoint"]
    alone = tmp_path / "elsewhere" / "model.pt"
    alone.parent.mkdir()
    alone.write_bytes((run / "best.pt").read_bytes())
    assert evaluate.main(["--checkpoint", str(alone), *quick]) == 0
    moved = json.loads((alone.parent / "metrics.json").read_text())
    assert {k: v for k, v in moved.items() if k not in ("run", "checkpoint")} == \
           {k: v for k, v in metrics["--run"].items() if k not in ("run", "checkpoint")}
    bare = tmp_path / "bare" / "best.pt"  # as checkpoints were before they carried their configuration
    bare.parent.mkdir()
    torch.save({"model": torch.load(alone, weights_only=False)["model"]}, bare)
    capsys.readouterr()
    assert evaluate.main(["--checkpoint", str(bare), *quick]) == 2
    err = capsys.readouterr().err
    assert f"{bare} carries no configuration and has no config.json beside it" in err and len(err.splitlines()) == 1


def test_command_line_types_presets_and_ablations():
    cfgs, _ = train.parse_config(["--ablation", "w/o Mamba", "--lr", "2e-4", "--use-gradnorm", "false"])
    assert cfgs.train.data == "synth" and cfgs.train.lr == 2e-4 and cfgs.model.fusion_mamba is False
    assert cfgs.loss.use_gradnorm is False and cfgs.model.vision_model == ""  # the SynthPEDES preset: a small ViT
    assert cfgs.retrieval == evaluate.RetrievalConfig(-1, -1, -1)  # beta, K and a chosen on validation
    assert cfgs == train.Configs(*(dataclasses.replace(getattr(train.presets("synth"), owner), **fields) for owner, fields
                                   in (("train", dict(lr=2e-4)), ("model", dict(fusion_mamba=False)),
                                       ("loss", dict(use_gradnorm=False)), ("retrieval", {}))))  # nothing else
    cfgs, _ = train.parse_config(["--data", "cuhk"])
    assert cfgs.model.vision_model == "google/vit-base-patch16-224" and cfgs.model.image_size == (224, 224)
    assert cfgs.train.lr == 1e-4 and cfgs.train.weight_decay == 1e-3 and cfgs.loss.gradnorm_alpha == 1.5  # Sec. IV-A
    for row, flags in train.ABLATIONS.items():  # every row is flags that the parser takes, on either preset
        for data_name in ("synth", "cuhk"):
            assert train.parse_config(["--data", data_name, "--ablation", row])[0] == \
                   train.parse_config(["--data", data_name, *flags.split()])[0], row
    for bad in (["--no-such-field", "1"], ["--epochs", "ten"], ["--use-bdam", "maybe"], ["--data", "mnist"]):
        with pytest.raises(SystemExit):
            train.parse_config(bad)
    with pytest.raises(SystemExit):  # a resumed run keeps its saved configuration
        train.parse_config(["--resume", "runs/x", "--lr", "1"])


def test_switches_that_contradict_across_configs_are_a_command_line_error(capsys):
    """use_bdam, clothing_stream and use_fusion (ModelConfig) against the losses that need them
    (LossConfig): parse_config's error (train.check_configs) names the fix, from flags and from
    an ablation row with a flag on top."""
    for argv, fix in ((["--use-bdam", "false"], "loss_aln needs the clothing stream (use_bdam and clothing_stream): "
                                                "set loss_aln=False"),
                      (["--ablation", "w/o L_aln", "--loss-aln", "true"], "loss_aln needs the clothing stream"),
                      (["--use-bdam", "false", "--loss-aln", "false"],
                       "use_bdam=False leaves no clothing feature: set loss_aln=False, loss_decouple=False"),
                      (["--ablation", "w/o fusion", "--loss-fusion", "true"],
                       "use_fusion=False: set loss_fusion=False too")):
        with pytest.raises(SystemExit):
            train.parse_config(argv)
        assert fix in capsys.readouterr().err, argv
    cfgs, _ = train.parse_config(["--use-bdam", "false", "--loss-aln", "false", "--loss-decouple", "false"])
    assert cfgs.model.use_bdam is False and cfgs.loss.loss_names() == ["info", "triplet", "fusion"]


OBJECTIVE = {"model": ("fusion_candidates", "fusion_detach"), "retrieval": ("rerank_k", "fusion_weight",
                                                                           "clothing_weight")}


def as_written_with_an_objective(cfgs: train.Configs) -> dict:
    """config.json as train.py wrote it while an ObjectiveConfig held the losses' fields, the
    fusion's two training fields and the retrieval settings: "train", "model", "objective"."""
    saved = cfgs.as_dict()
    model = {k: v for k, v in saved["model"].items() if k not in (*OBJECTIVE["model"], "clothing_stream")}
    objective = {**saved["loss"], **{k: saved["model"][k] for k in OBJECTIVE["model"]}, **saved["retrieval"]}
    return {"train": saved["train"], "model": model, "objective": objective}


def test_resume_reads_config_json_old_and_new(tmp_path, monkeypatch):
    """config.json holds "train", "model", "loss" and "retrieval"; a run written while an
    "objective" section held the losses', the fusion's and retrieval's fields has them split out
    to their owners by name."""
    monkeypatch.chdir(tmp_path)
    flags = ["--ablation", "w/o L_decouple", "--rerank-k", "7", "--fusion-candidates", "4", "--temperature", "0.05"]
    cfgs, _ = train.parse_config([*flags, "--name", "new"])
    run, _ = start_run(cfgs.train, cfgs.as_dict(), None)
    assert set(json.loads((run / "config.json").read_text())) == {"train", "model", "loss", "retrieval"}
    assert train.parse_config(["--resume", str(run)])[0] == cfgs
    old = tmp_path / "runs" / "old"
    old.mkdir()
    (old / "config.json").write_text(json.dumps(as_written_with_an_objective(cfgs)))
    back = train.parse_config(["--resume", str(old)])[0]
    assert (back.model.fusion_candidates, back.retrieval.rerank_k, back.loss.temperature) == (4, 7, 0.05)
    assert back == cfgs


def test_resume_of_a_run_without_l_aln_written_with_an_objective_has_no_clothing_stream(tmp_path):
    """A "w/o L_aln" run written with an "objective" section trained a model without clothing
    projections (they existed for L_aln alone then): read back, clothing_stream is off, so that
    its checkpoints fit the model built from its configuration."""
    cfgs, _ = train.parse_config(["--ablation", "w/o L_aln"])
    assert cfgs.model.clothing_stream is False
    (tmp_path / "config.json").write_text(json.dumps(as_written_with_an_objective(cfgs)))
    assert train.parse_config(["--resume", str(tmp_path)])[0] == cfgs


def test_both_regimes_train_on_as_many_photographs_per_identity(monkeypatch, tmp_path):
    """--synth-train-images counts photographs of each training identity, over its outfits: the
    preset's 72 are 24 of each of 3 outfits (cloth-changing) or 72 of the one outfit (same-clothes)."""
    asked = {}

    class Generated(Exception):
        pass

    def ensure(root, **settings):
        asked.update(settings)
        raise Generated  # what was asked for is all this test needs
    monkeypatch.setattr(synthpedes, "ensure_synthpedes", ensure)
    for regime, per_outfit in (("cloth-changing", 24), ("same-clothes", 72)):
        cfgs, _ = train.parse_config(["--root", str(tmp_path), "--synth-regime", regime])
        with pytest.raises(Generated):
            train.prepare_data(cfgs.train)
        assert asked["regime"] == regime and asked["train_images_per_outfit"] == per_outfit
    cfgs, _ = train.parse_config(["--root", str(tmp_path), "--synth-train-images", "0"])
    with pytest.raises(Generated):
        train.prepare_data(cfgs.train)
    assert asked["train_images_per_outfit"] is None  # as many as the validation and test outfits


def test_bench_prints_where_a_training_step_goes(capsys):
    """`python -m tools.train_bench`: a row per part, the whole step, the baseline."""
    from tools import train_bench
    assert train_bench.main([*TINY, "--p", "4", "--k", "2"]) == 0
    out = capsys.readouterr().out
    for part in ("vision encoder (ViT)", "text encoder (2 texts)", "BDAM", "fusion (S x Q image-text pairs)",
                 "losses (compute_losses)", "GradNorm's K - 1 extra gradients", "optimiser (Adam)"):
        assert part in out, part
    whole = next(line for line in out.splitlines() if line.startswith("whole training step"))
    assert float(whole.split()[3]) > 0 and "images / s" in whole
    assert "baseline: ViT + text encoder (2 texts) alone" in out


def test_amp_flag_takes_bf16_fp16_off_and_old_configs_true_false(tmp_path, monkeypatch, capsys):
    """--amp bf16 | fp16 | off; true / false, the flag and config.json of runs from before fp16,
    read as bf16 / off; anything else is a one-line command-line error."""
    assert [train.parse_config(["--amp", v])[0].train.amp for v in ("fp16", "off", "true", "false")] == [
        "fp16", "off", "bf16", "off"]
    assert train.parse_config([])[0].train.amp == "bf16" and train.parse_config([])[0].train.grad_checkpoint is False
    assert train.parse_config(["--grad-checkpoint", "true"])[0].train.grad_checkpoint is True
    with pytest.raises(SystemExit):
        train.parse_config(["--amp", "fp8"])
    assert "amp must be bf16, fp16 or off" in capsys.readouterr().err
    monkeypatch.chdir(tmp_path)
    cfgs, _ = train.parse_config(["--name", "old"])
    run, _ = start_run(cfgs.train, cfgs.as_dict(), None)
    saved = json.loads((run / "config.json").read_text())
    for old, mode in ((True, "bf16"), (False, "off")):
        (run / "config.json").write_text(json.dumps({**saved, "train": {**saved["train"], "amp": old}}))
        assert train.parse_config(["--resume", str(run)])[0].train.amp == mode


def test_update_with_a_loss_scale_is_the_unscaled_update(synth_root):
    """train.update with a GradScaler (--amp fp16; a CPU one at scale 1024 here, fp32 numbers):
    the same network parameters, GradNorm weights and log row as without one, and the scaler's
    state in last.pt's dict."""
    cfgs = config(synth_root, "--p", "4", "--k", "2", "--dropout", "0")
    cfg, mcfg, cpu = cfgs.train, cfgs.model, torch.device("cpu")
    dataset = data.load_dataset("synth", synth_root)
    sampler = data.IdentitySampler([s.pid for s in dataset.train], cfg.p, cfg.k, seed=0)
    loader = make_loader(training_items(dataset, cfg, mcfg), sampler, 0, 0, load_tokenizer(mcfg.text_model or None),
                         cfg, mcfg.max_text_len, cpu)
    batch = next(iter(loader))
    results = []
    for scaler in (None, torch.amp.GradScaler("cpu", init_scale=1024.0)):
        torch.manual_seed(0)
        state = train.State.create(cfgs, cpu, total_steps=10)
        state.scaler = scaler
        with forward_context(cpu, "off"):
            losses = compute_losses(state.model(batch), batch, cfgs.loss)
        row = train.update(state, losses)
        results.append((row, [p.detach().clone() for p in state.model.parameters()], state.gradnorm.weights()))
    (row, params, weights), (row_s, params_s, weights_s) = results
    assert row.keys() == row_s.keys() and all(row_s[k] == pytest.approx(row[k], rel=1e-5, abs=1e-7) for k in row)
    torch.testing.assert_close(weights_s, weights, rtol=1e-5, atol=1e-7)
    for got, want in zip(params_s, params):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert state.state_dict()["scaler"]["scale"] == 1024.0


def test_memory_estimator_counts_a_linear_layers_saved_input_by_dtype():
    """train_bench.saved_for_backward by hand: nn.Linear(8, 4) on a (5, 8) input keeps its input
    for the weight's gradient, 5 x 8 x 4 = 160 bytes in fp32 (the weight is a parameter: not
    counted). Under bf16 autocast it keeps the input's bf16 copy, 80 bytes; when the input needs
    a gradient too, also the weight's bf16 copy (4 x 8 x 2 = 64 bytes: a copy, not the parameter).
    A tensor saved twice counts once."""
    from tools import train_bench
    layer = nn.Linear(8, 4)
    x = torch.randn(5, 8)
    saved = train_bench.saved_for_backward(lambda: layer(x), list(layer.parameters()))
    assert saved == [(160, torch.float32, None)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert train_bench.saved_for_backward(lambda: layer(x), list(layer.parameters())) == [(80, torch.bfloat16, None)]
        saved = train_bench.saved_for_backward(lambda: layer(x.requires_grad_()), list(layer.parameters()))
    assert sorted(n for n, _, _ in saved) == [64, 80] and {d for _, d, _ in saved} == {torch.bfloat16}
    y = torch.randn(6, requires_grad=True)
    assert train_bench.saved_for_backward(lambda: y * y) == [(24, torch.float32, None)]  # y saved twice
    # the layer whose forward saved it (where a checkpointed layer's recomputation would hold it)
    net = nn.Sequential(nn.Linear(8, 8), nn.ReLU())
    saved = train_bench.saved_for_backward(lambda: net(x) * 2, list(net.parameters()), layers=[net[1]])
    assert len(saved) == 2 and {(n, where) for n, _, where in saved} == {(160, None), (160, 0)}  # x; ReLU's output


def test_memory_table_of_a_tiny_model(capsys):
    """python -m tools.train_bench --memory's table on the tests' tiny model: checkpointing keeps less
    per image, bf16 autocast keeps bf16 activations, and each estimate is fixed + batch x per image."""
    from tools import train_bench
    cfgs = config(Path("unused"))
    result = train_bench.memory_table(cfgs.model, cfgs.loss, batches=(32, 64), measured=4)
    out = capsys.readouterr().out
    assert "bf16 autocast, checkpointed" in out and "bfloat16" in out and "largest batch in 24 GiB" in out
    for amp in ("bf16", "off"):
        assert result[amp, True][1] < result[amp, False][1] and result[amp, True][0] == result[amp, False][0]
    assert result["bf16", False][1] < result["off", False][1]
