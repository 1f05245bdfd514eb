"""The training batches: data.py's P x K identity sampler and transforms, served so that a
resumed run replays exactly the batches it would have seen."""
from __future__ import annotations

import functools
import os

import torch
from tqdm import tqdm

import data
from helpers.distributed import leave_process_group, rank


class SeededItems(torch.utils.data.Dataset):
    """Item (epoch, i) of a TrainSet, its augmentation drawn from a generator seeded by
    (seed, epoch, i): the same batches with any number of loader workers, and the main process's
    RNG (dropout) left alone."""

    def __init__(self, dataset: data.TrainSet, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        epoch, i = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((self.seed * 1_000_003 + epoch) * 10_000_019 + i)
            return self.dataset[i]


def training_items(dataset: data.ReIDData, train_cfg, model_cfg) -> SeededItems:
    """The training split as seeded items with the run's augmentation (random erasing at erase_p)."""
    transform = data.train_transform(model_cfg.image_size, train_cfg.erase_p)
    return SeededItems(data.TrainSet(dataset.train, transform), train_cfg.seed)


def loader_workers(workers: int, device: torch.device) -> int:
    """--workers as given; for -1: none on a CPU (its cores run the step), else the cores less
    one (at most 8), so that decoding images keeps up with the GPU."""
    if workers >= 0:
        return workers
    return 0 if device.type == "cpu" else max(1, min(8, (os.cpu_count() or 2) - 1))


def make_loader(items: SeededItems, sampler: data.IdentitySampler, epoch: int, skip: int, tokenizer,
                train_cfg, max_len: int, device: torch.device):
    """The P x K batches of `epoch`, less the first `skip` (already trained on)."""
    sampler.set_epoch(epoch)
    batches = [[(epoch, i) for i in batch] for batch in list(sampler)[skip:]]
    collate = functools.partial(data.collate, tokenizer=tokenizer, max_len=max_len)
    # its own generator: creating the iterator must not draw from the main RNG (dropout)
    return torch.utils.data.DataLoader(items, batch_sampler=batches, collate_fn=collate,
                                       num_workers=loader_workers(train_cfg.workers, device),
                                       pin_memory=torch.cuda.is_available(), worker_init_fn=leave_process_group,
                                       generator=torch.Generator().manual_seed(train_cfg.seed))


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: to_device(v, device) if isinstance(v, dict) else v.to(device, non_blocking=True)
            for k, v in batch.items()}


@torch.no_grad()
def fill_text_cache(model, texts: list[str], tokenizer, max_len: int, device, chunk: int = 64) -> None:
    """The frozen text layers' states of every training text, computed once before the first
    step (model.FrozenTextPrefix): an epoch then costs only the layers above."""
    if model.frozen_text is None:
        return
    texts = sorted(texts, key=lambda text: (len(text), text))  # similar lengths pad little
    for start in tqdm(range(0, len(texts), chunk), desc=f"frozen text layers: {len(texts)} texts", leave=False,
                      disable=rank() > 0):
        model.frozen_text.fill(**to_device(data.tokenize(tokenizer, texts[start:start + chunk], max_len), device))
