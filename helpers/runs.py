"""Finding and reading what train.py writes: a run folder's checkpoint and the configuration it
carries; evaluate.py builds the model from them. Errors say what to do."""
from __future__ import annotations

import json
import pickle
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
