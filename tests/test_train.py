"""train.py end to end on a small SynthPEDES: it learns (beats chance by a margin), it resumes
exactly, it survives Ctrl-C, and bad runs stop with clear messages."""
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import data
import evaluate
import mamba_triton
import synthpedes
import train
from encoders import load_tokenizer
from model import T2IReID

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
    cfg, _, _ = train.parse_config(["--root", str(root), *SYNTH])
    train.prepare_data(cfg)
    return root


def config(root, *extra):
    cfg, mcfg, _ = train.parse_config(["--root", str(root), *SYNTH, *TINY, *extra])
    return cfg, mcfg


def test_training_retrieves_held_out_people_far_above_chance(tmp_path_factory, tmp_path, monkeypatch):
    """The pipeline learns what generalises: the SynthPEDES preset's model, trained for 136 steps
    (2 epochs of the default dataset, two photographs per outfit), ranks the test split's 90
    identities -- never seen in training -- far above chance with their captions, in both
    stages. Misaligned image-text pairs, a detached branch, an evaluation path that disagrees
    with training, or a model that only memorises its training images all fail it. About three
    minutes on two CPU cores; on this machine it reached R1 5.7 and mAP 5.0 (stage 2 mAP 4.7)
    where chance is 1.1."""
    monkeypatch.chdir(tmp_path)
    root = tmp_path_factory.mktemp("synth300")
    cfg, mcfg, _ = train.parse_config(["--root", str(root), "--synth-train-images", "0", "--epochs", "2",
                                       "--fusion-identity-queries", "false", "--final-eval", "false"])
    run = train.train(cfg, mcfg)
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
    assert all(0 < row["w_info"] < len(mcfg.loss_names()) for row in steps)  # GradNorm weights bounded
    assert (Path("runs") / "latest").resolve() == run.resolve()
    assert {"last.pt", "best.pt", "config.json"} <= {p.name for p in run.iterdir()}


def test_final_evaluation_writes_both_stages_and_robustness(synth_root, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = train.train(*config(synth_root, "--p", "4", "--k", "2", "--max-steps", "2"))
    results = json.loads((run / "results.json").read_text())
    assert results["num_queries"] == len(data.load_dataset("synth", synth_root).queries)
    assert set(results["robustness"]) == {"Standard", "Identity-Only", "Clothes-Conflict"}
    for stage in ("stage1", "stage2"):
        assert all(0 <= v <= 100 for v in results[stage].values())


def test_resume_continues_exactly(synth_root, tmp_path, monkeypatch):
    """4 steps straight == 2 steps, stop, resume, 2 more: same weights, same log."""
    monkeypatch.chdir(tmp_path)
    base = ["--epochs", "2", "--p", "4", "--k", "2", "--final-eval", "false", "--checkpoint-every", "1"]
    straight = train.train(*config(synth_root, *base, "--max-steps", "5", "--name", "straight"))
    halves = train.train(*config(synth_root, *base, "--max-steps", "2", "--name", "halves"))
    cfg, mcfg = config(synth_root, *base, "--max-steps", "5", "--name", "halves")
    train.train(cfg, mcfg, run=halves)
    a = torch.load(straight / "last.pt", weights_only=False)
    b = torch.load(halves / "last.pt", weights_only=False)
    assert a["global_step"] == b["global_step"] == 5
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    assert torch.equal(a["gradnorm"]["log_weights"], b["gradnorm"]["log_weights"])
    losses = lambda run: [row["total"] for row in map(json.loads, (run / "log.jsonl").read_text().splitlines())
                          if "total" in row]  # noqa: E731
    assert losses(straight) == losses(halves)


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


def test_non_finite_loss_stops_with_the_loss_named(synth_root, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    real = train.compute_losses

    def broken(out, batch, cfg):
        losses = real(out, batch, cfg)
        return {**losses, "triplet": losses["triplet"] * float("nan")}

    monkeypatch.setattr(train, "compute_losses", broken)
    with pytest.raises(train.TrainingError, match="loss triplet = nan at step 1"):
        train.train(*config(synth_root, "--p", "4", "--k", "2", "--max-steps", "1"))


def test_real_benchmark_without_descriptions_names_the_describe_command(tmp_path):
    folder = tmp_path / "CUHK-PEDES"
    (folder / "imgs").mkdir(parents=True)
    (folder / "reid_raw.json").write_text(json.dumps([{"split": "train", "captions": ["a man"],
                                                        "file_path": "a.jpg", "processed_tokens": [["a", "man"]],
                                                        "id": 1}]))
    cfg, _, _ = train.parse_config(["--data", "cuhk", "--root", str(tmp_path)])
    with pytest.raises(data.DatasetError, match="python describe.py --data cuhk"):
        train.prepare_data(cfg)


def test_command_line_types_presets_and_ablations():
    cfg, mcfg, _ = train.parse_config(["--ablation", "w/o Mamba", "--lr", "2e-4", "--use-gradnorm", "false"])
    assert cfg.data == "synth" and cfg.lr == 2e-4 and mcfg.fusion_mamba is False and mcfg.use_gradnorm is False
    assert mcfg.vision_model == ""  # the SynthPEDES preset: a small ViT from its config
    cfg, mcfg, _ = train.parse_config(["--data", "cuhk"])
    assert mcfg.vision_model == "google/vit-base-patch16-224" and mcfg.image_size == (224, 224)
    assert cfg.lr == 1e-4 and cfg.weight_decay == 1e-3 and mcfg.gradnorm_alpha == 1.5  # Sec. IV-A
    for bad in (["--no-such-field", "1"], ["--epochs", "ten"], ["--use-bdam", "maybe"], ["--data", "mnist"]):
        with pytest.raises(SystemExit):
            train.parse_config(bad)
    with pytest.raises(SystemExit):  # a resumed run keeps its saved configuration
        train.parse_config(["--resume", "runs/x", "--lr", "1"])


def test_both_regimes_train_on_as_many_photographs_per_identity(monkeypatch, tmp_path):
    """--synth-train-images counts photographs of each training identity, over its outfits: the
    preset's 36 are 12 of each of 3 outfits (cloth-changing) or 36 of the one outfit (same-clothes)."""
    asked = {}

    class Generated(Exception):
        pass

    def ensure(root, **settings):
        asked.update(settings)
        raise Generated  # what was asked for is all this test needs
    monkeypatch.setattr(synthpedes, "ensure_synthpedes", ensure)
    for regime, per_outfit in (("cloth-changing", 12), ("same-clothes", 36)):
        cfg, _, _ = train.parse_config(["--root", str(tmp_path), "--synth-regime", regime])
        with pytest.raises(Generated):
            train.prepare_data(cfg)
        assert asked["regime"] == regime and asked["train_images_per_outfit"] == per_outfit
    cfg, _, _ = train.parse_config(["--root", str(tmp_path), "--synth-train-images", "0"])
    with pytest.raises(Generated):
        train.prepare_data(cfg)
    assert asked["train_images_per_outfit"] is None  # as many as the validation and test outfits
