"""The run folders: train.py makes one (config.json, runs/latest) and resumes it; evaluate.py
finds its checkpoint and the configuration it carries. Errors say what to do."""
from __future__ import annotations

import json
import pickle
import time
from pathlib import Path

import torch


class RunError(Exception):
    """A run folder or checkpoint that cannot be used; the message says what to do."""


def find_checkpoint(run=None, runs_dir="runs") -> Path:
    """A run folder written by train.py (default: runs/latest, else the newest run under runs/):
    its best.pt, else its last.pt."""
    hint = "train a model first with `python train.py`"
    if run is None:
        configs = sorted(Path(runs_dir).glob("*/config.json"), key=lambda p: p.stat().st_mtime)
        if not configs:
            raise RunError(f"no runs under {Path(runs_dir).resolve()}: {hint}.")
        latest = Path(runs_dir) / "latest"
        run = latest.resolve() if (latest / "config.json").is_file() else configs[-1].parent
    folder = Path(run)
    checkpoint = next((folder / n for n in ("best.pt", "last.pt") if (folder / n).is_file()), None)
    if checkpoint is None and not (folder / "config.json").is_file():
        raise RunError(f"{folder} is not a run folder (no config.json, no best.pt): {hint}, or pass --run runs/NAME.")
    if checkpoint is None:
        raise RunError(f"{folder} has no best.pt or last.pt (stopped before its first checkpoint): {hint}.")
    return checkpoint


def read_saved(path: Path) -> tuple[dict, dict, Path]:
    """(the checkpoint, the configuration it carries or the config.json beside it, where that came from)."""
    fix = "pass a best.pt or last.pt that train.py wrote"
    if not path.is_file():
        raise RunError(f"{path}: no such file; {fix}.")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=False)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as e:  # not a torch file, or cut short
        raise RunError(f"{path}: not a checkpoint torch can read ({str(e)[:100]}); {fix}.") from None
    if not isinstance(saved, dict) or "model" not in saved:
        raise RunError(f"{path}: no model weights in it; {fix}.")
    if saved.get("config"):
        return saved, saved["config"], path
    if (path.parent / "config.json").is_file():
        return saved, json.loads((path.parent / "config.json").read_text()), path.parent / "config.json"
    raise RunError(f"{path} carries no configuration and has no config.json beside it: copy the run's "
                   f"config.json next to it (train.py writes it in the run folder), or use --run runs/NAME.")


def start_run(train_cfg, config: dict, run: Path | None) -> tuple[Path, bool]:
    """A new run folder with config.json, or the folder of a run to resume; runs/latest -> it."""
    resume = run is not None
    if resume and not (run / "last.pt").exists():
        raise RunError(f"{run / 'last.pt'} does not exist: nothing to resume")
    if not resume:
        run = Path("runs") / (train_cfg.name or f"{train_cfg.data}-{time.strftime('%Y%m%d-%H%M%S')}")
        run.mkdir(parents=True, exist_ok=True)
        (run / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    latest = run.parent / "latest"
    if latest.is_symlink() or not latest.exists():
        latest.unlink(missing_ok=True)
        latest.symlink_to(run.resolve(), target_is_directory=True)
    return run, resume


def trim_log(path: Path, last_step: int) -> None:
    """On resume, drop the log lines of steps after the checkpoint: they are trained again."""
    if path.exists():
        rows = [line for line in path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= last_step]
        path.write_text("".join(row + "\n" for row in rows))
