"""What a checkpoint needs beyond the weights: the random states of every process, so that a
resumed run draws the dropout masks it would have drawn, and a write that a kill cannot break."""
from __future__ import annotations

import os
import random
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from helpers.distributed import rank, world


def save(obj: dict, path: Path) -> None:
    """Write to a temporary file, then rename: a kill mid-write never leaves a broken file."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def random_states() -> dict:
    """Every process's random states (a collective under torchrun): "rng_ranks", and "rng" rank 0's."""
    rng = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
           "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
    rng_ranks = [rng] * world()
    if world() > 1:
        dist.all_gather_object(rng_ranks, rng)
    return {"rng": rng_ranks[0], "rng_ranks": rng_ranks}


def restore_random_states(saved: dict) -> None:
    """This process's random states from random_states(); resumed with another number of
    processes, rank 0 takes the first and the others keep their own (other dropout masks)."""
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
