"""Several processes (torchrun): DistributedDataParallel over the P x K identity batch; and a
run's processes stopped cleanly by Ctrl-C or SIGTERM.

Each process takes P/N whole identities of the batch (data.IdentitySampler); the losses see the
global batch, gathered from every process (docs/design.md#12-several-processes-the-losses-see-the-global-batch). With one process all of
this is a no-op. A stop request (`StopRequest`) ends the run after a whole step, on every process
alike, and the data loader's workers keep out of the signal's way (`leave_process_group`). Used
by train.py:

    torchrun --nproc_per_node 4 train.py --data cuhk

Test: pytest tests/test_train.py -k "processes or ctrl_c or sigterm"
"""
import os
import signal
import sys
import threading

import torch
import torch.distributed as dist
import torch.nn.functional as F


def init_distributed(device: torch.device) -> torch.device:
    """This process's device (`device`, or its LOCAL_RANK GPU); under torchrun (WORLD_SIZE > 1)
    also join the process group: nccl with one GPU per process, gloo on CPUs."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1 or dist.is_initialized():
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def from_rank0(obj):
    """Rank 0's `obj` on every process (a run folder's name, chosen once)."""
    box = [obj]
    if world() > 1:
        dist.broadcast_object_list(box, src=0)
    return box[0]


def any_process(flag: bool, device) -> bool:
    """True everywhere if True anywhere: a Ctrl-C reaches the processes mid-step at different
    moments, and all must stop after the same step (or the next collective waits forever)."""
    if world() == 1:
        return flag
    value = torch.tensor(float(flag), device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value)


def mean_over_processes(tensor: torch.Tensor) -> torch.Tensor:
    """The mean over processes (GradNorm's task gradients on its shared layer)."""
    tensor = tensor.contiguous()
    dist.all_reduce(tensor)
    return tensor / world()


class GatherRows(torch.autograd.Function):
    """(B/N, ...) rows of each process -> (B, ...), concatenated in rank order.

    Backward: every process computes the same loss from the same gathered rows, so each of the
    N copies of the loss gives this process's rows the same gradient; all_gather's usual
    backward (a reduce-scatter) would add N equal terms: we multiply by N instead and skip the
    communication. DDP then averages the parameters' gradients over the processes, which makes
    the sum over processes of each one's share: the gradient of the global-batch loss."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(rows) for _ in range(world())]
        dist.all_gather(parts, rows.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        n = len(grad) // world()
        return grad[rank() * n:(rank() + 1) * n] * world()


def gather_batch(out: dict, batch: dict) -> tuple[dict, dict]:
    """The model's outputs and the labels that losses.compute_losses reads, over the global
    batch: the InfoNCE negatives, the triplet's hardest pairs and HSIC see every process's
    samples, as on one process. Only the labels compute_losses reads are returned (a new one is
    a KeyError, not a silently local label). Token ids are padded to the longest anywhere."""
    if world() == 1:
        return out, batch
    out = {key: GatherRows.apply(value) if torch.is_tensor(value) else value for key, value in out.items()}
    ids = batch["clothing"]["input_ids"]  # (B/N, T) padded to this process's longest text
    length = torch.tensor(ids.shape[1], device=ids.device)
    dist.all_reduce(length, op=dist.ReduceOp.MAX)
    ids = F.pad(ids, (0, int(length) - ids.shape[1]))  # [PAD] is 0, as data.tokenize pads
    return out, {"pids": GatherRows.apply(batch["pids"]), "clothing": {"input_ids": GatherRows.apply(ids)}}


# ----------------------------------------------------------------------------------------------
# Stopping: Ctrl-C or SIGTERM ends a run after a whole step, on every process alike


def leave_process_group(worker_id: int) -> None:
    """A loader worker moves to a process group of its own, so that Ctrl-C or a SIGTERM to the
    run's group (a scheduler's, `timeout`'s) reaches the main process alone: it finishes the step,
    saves last.pt and shuts the workers down itself. Left in the group, a worker dies of the
    signal and the loader's shutdown raises "DataLoader worker ... is killed by signal"."""
    os.setpgid(0, 0)


class StopRequest:
    """Ctrl-C or SIGTERM: finish the current step, save last.pt, and stop. A second Ctrl-C
    interrupts at once (last.pt then holds the previous checkpoint)."""

    def __init__(self):
        self.requested = False
        self.previous = {}

    def __enter__(self):
        if threading.current_thread() is not threading.main_thread():
            return self  # signal handlers can only be set from the main thread
        for sig in (signal.SIGINT, signal.SIGTERM):
            self.previous[sig] = signal.signal(sig, self.handle)
        return self

    def handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nstopping after this step; saving last.pt (Ctrl-C again to quit at once)", file=sys.stderr)

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
