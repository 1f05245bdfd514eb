"""Pictures of a run: ranked lists, the gate histograms of Fig. 5, the gates and GradNorm's task
weights over training, and training at a glance (each task's loss, the task weights, the
validation Rank-1), all from the run's outputs and its log.jsonl.

What people would rather see than read (evaluate.py writes them next to metrics.json; train.py
writes training_curves.png at the end of each run): a ranked list shows at a glance whether the
top images are the same *person*, in other clothes too.

Tests: pytest tests/test_evaluate.py -k "picture or gate"
"""
from __future__ import annotations

import json
import textwrap
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

from data import load_image


THUMB = (128, 64)  # (H, W) of each image in the ranked list
FRAME, GAP, TEXT_WIDTH = 4, 6, 260  # pixels: frame around each image, space between, text column
FRAME_COLOURS = {True: (30, 160, 60), False: (210, 40, 40), None: (150, 150, 150)}


def ranked_list_picture(queries: list, ranked: list, correct: list | None, path, top: int = 10) -> Path:
    """One row per query: its wrapped text, then its top images framed green (the query's
    identity), red (another identity) or grey (`correct` is None: unknown)."""
    h, w = THUMB
    cell_w, cell_h = w + 2 * FRAME + GAP, h + 2 * FRAME + GAP
    canvas = Image.new("RGB", (TEXT_WIDTH + top * cell_w, len(queries) * cell_h), "white")
    draw, font = ImageDraw.Draw(canvas), ImageFont.load_default(size=12)
    lines_fit = (h + 2 * FRAME) // 15
    for row, (text, paths) in enumerate(zip(queries, ranked)):
        y = row * cell_h + GAP // 2
        lines = textwrap.wrap(text, width=38)
        if len(lines) > lines_fit:
            lines = lines[:lines_fit - 1] + [lines[lines_fit - 1] + " ..."]
        draw.multiline_text((GAP, y), "\n".join(lines), fill="black", font=font, spacing=3)
        for col, image_path in enumerate(paths[:top]):
            x = TEXT_WIDTH + col * cell_w
            flag = None if correct is None else bool(correct[row][col])
            draw.rectangle([x, y, x + w + 2 * FRAME - 1, y + h + 2 * FRAME - 1], fill=FRAME_COLOURS[flag])
            canvas.paste(load_image(image_path).resize((w, h), Image.Resampling.BILINEAR), (x + FRAME, y + FRAME))
    canvas.save(path)
    return Path(path)


def _pyplot():
    """matplotlib's pyplot on the Agg backend: files only, no display needed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path, dpi: int) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    _pyplot().close(fig)
    return Path(path)


def gate_histograms(gates: dict, path, size=(9.0, 3.2), dpi: int = 100) -> Path:
    """Fig. 5: the BDAM gate g (identity share of each gallery image) and the fusion gate W_img
    (image share of each re-ranking pair), from evaluate_model's gate summaries."""
    fig, axes = _pyplot().subplots(1, 2, figsize=size, dpi=dpi)
    panels = [("bdam", "BDAM gate g (identity share, per image)", "tab:blue"),
              ("fusion", "fusion gate W_img (image share, per pair)", "tab:orange")]
    for ax, (key, title, colour) in zip(axes, panels):
        ax.set_title(title, fontsize=10)
        ax.set_xlim(0, 1)
        summary = gates.get(key)
        if summary is None:
            ax.text(0.5, 0.5, "not in this model", ha="center", va="center", transform=ax.transAxes)
            continue
        edges = torch.linspace(0, 1, len(summary["hist"]) + 1)
        ax.bar(edges[:-1].tolist(), summary["hist"], width=float(edges[1]), align="edge", color=colour)
        ax.axvline(summary["mean"], color="black", linestyle="--", linewidth=1)
        ax.set_xlabel(f"mean {summary['mean']:.3f} +- {summary['std']:.3f} (n = {summary['count']})")
        ax.set_ylabel("count")
    return _save(fig, path, dpi)


TASKS = ("aln", "decouple", "info", "triplet", "fusion")  # the losses, as model.ObjectiveConfig.loss_names


def read_log(path) -> list[dict]:
    """The rows of a run's log.jsonl (train.py): one per step, one per validation; [] if absent."""
    path = Path(path)
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def training_curves(log_rows: list) -> dict:
    """The series the pictures of training draw, from the rows of a run's log.jsonl: {panel:
    {label: (steps, values)}} for the panels "w_img" (the fusion gate on each text's own image),
    "g_std" (the BDAM gate's per-channel spread over the batch; both train.gate_stats), "weights"
    (each task's GradNorm weight w_k), "losses" (each task's loss L_k), both keyed by task, and
    "val_R1" (stage-1 Rank-1 on the validation split, one point per evaluation). Absent keys and
    None values (an evaluation without a validation split) are skipped."""
    def series(key):
        points = [(r["step"], r[key]) for r in log_rows if r.get(key) is not None]
        return tuple(map(list, zip(*points))) if points else None
    curves = {"w_img": {"W_img": series("w_img")}, "g_std": {"g std": series("g_std")},
              "weights": {task: series(f"w_{task}") for task in TASKS},
              "losses": {task: series(task) for task in TASKS}, "val_R1": {"val R1": series("val_R1")}}
    return {panel: {label: s for label, s in lines.items() if s} for panel, lines in curves.items()}


def _weights_panel(ax, lines: dict) -> None:
    """GradNorm's w_k on a log scale between the 0.2 and 5 lines that no weight should cross
    (README.md#results)."""
    for task, (steps, values) in lines.items():
        ax.plot(steps, values, linewidth=1, label=task)
    ax.set_yscale("log")
    ax.set_yticks([0.2, 0.5, 1, 2, 5], ["0.2", "0.5", "1", "2", "5"])
    ax.minorticks_off()
    for bound in (0.2, 5.0):
        ax.axhline(bound, color="grey", linestyle="--", linewidth=0.8)
    ax.legend(fontsize=8, loc="best")


def gate_curves(log_rows: list, path, size=(13.5, 3.2), dpi: int = 100) -> Path | None:
    """Both gates and GradNorm's task weights over training (training_curves): W_img, the BDAM
    gate's spread, and each w_k. Where W_img settles decides whether the fusion reads the image.
    None when the log has none of them (a run logged before they were)."""
    curves = training_curves(log_rows)
    if not any(curves[key] for key in ("w_img", "g_std", "weights")):
        return None
    fig, axes = _pyplot().subplots(1, 3, figsize=size, dpi=dpi)
    panels = [("w_img", "fusion gate W_img (image share)", (0, 1)),
              ("g_std", "BDAM gate g, per-channel std over the batch", None),
              ("weights", "GradNorm task weights w_k (Eq. 5-6)", None)]
    for ax, (key, title, limits) in zip(axes, panels):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        if limits:
            ax.set_ylim(*limits)
        if not curves[key]:
            ax.text(0.5, 0.5, "not in this run", ha="center", va="center", transform=ax.transAxes)
        elif key == "weights":
            _weights_panel(ax, curves[key])
        else:
            for label, (steps, values) in curves[key].items():
                ax.plot(steps, values, linewidth=1, label=label)
    return _save(fig, path, dpi)


def running_mean(values: list, window: int) -> list:
    """The mean of each value and the window - 1 before it (fewer at the start)."""
    sums = torch.tensor([0.0, *values], dtype=torch.float64).cumsum(0)
    return [(sums[i + 1] - sums[max(0, i + 1 - window)]).item() / min(window, i + 1) for i in range(len(values))]


def training_figure(log_rows: list, size=(13.5, 3.4)):
    """Training at a glance (training_curves): each task's loss L_k (a running mean over about
    2% of the steps), GradNorm's task weights w_k, and the validation Rank-1 of each evaluation.
    A matplotlib Figure, or None when the log holds no training step."""
    curves = training_curves(log_rows)
    if not curves["losses"]:
        return None
    fig, (losses, weights, val) = _pyplot().subplots(1, 3, figsize=size)
    window = max(1, max(len(steps) for steps, _ in curves["losses"].values()) // 50)
    for task, (steps, values) in curves["losses"].items():
        losses.plot(steps, running_mean(values, window), linewidth=1, label=task)
    if all(v > 0 for _, values in curves["losses"].values() for v in values):
        losses.set_yscale("log")  # the losses differ by orders of magnitude (HSIC against InfoNCE)
    losses.legend(fontsize=8, loc="best")
    losses.set_title("each task's loss L_k" + (f" (running mean of {window} steps)" if window > 1 else ""),
                     fontsize=10)
    weights.set_title("GradNorm task weights w_k (Eq. 5-6)", fontsize=10)
    if curves["weights"]:
        _weights_panel(weights, curves["weights"])
    if curves["val_R1"]:
        steps, values = curves["val_R1"]["val R1"]
        val.plot(steps, values, marker="o", linewidth=1)
        best = max(range(len(values)), key=values.__getitem__)
        val.set_title(f"validation Rank-1 (best {values[best]:.1f} at step {steps[best]})", fontsize=10)
    else:  # an epoch's end logs val_R1 None without a validation split, nothing before it ends
        val.set_title("validation Rank-1", fontsize=10)
        why = ("no validation split:\nbest.pt is the last epoch" if any("val_R1" in r for r in log_rows)
               else "no validation yet:\nstopped before an epoch ended")
        val.text(0.5, 0.5, why, ha="center", va="center", transform=val.transAxes)
    for ax in (losses, weights, val):
        ax.set_xlabel("step")
    return fig


def training_picture(log_rows: list, path, dpi: int = 100) -> Path | None:
    """training_figure saved as a PNG (train.py writes runs/NAME/training_curves.png); None when
    there is nothing to draw."""
    fig = training_figure(log_rows)
    return None if fig is None else _save(fig, path, dpi)
