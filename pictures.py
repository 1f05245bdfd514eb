"""Pictures of a run: ranked lists, the gate histograms of Fig. 5, and the gates and GradNorm's
task weights over training.

What people would rather see than read (evaluate.py writes them next to metrics.json): a ranked
list shows at a glance whether the top images are the same *person*, in other clothes too.

Tests: pytest tests/test_evaluate.py -k "picture or gate"
"""
from __future__ import annotations

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


def gate_histograms(gates: dict, path, size=(9.0, 3.2), dpi: int = 100) -> Path:
    """Fig. 5: the BDAM gate g (identity share of each gallery image) and the fusion gate W_img
    (image share of each re-ranking pair), from evaluate_model's gate summaries."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=size, dpi=dpi)
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
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return Path(path)


TASKS = ("aln", "decouple", "info", "triplet", "fusion")  # the losses, as model.ObjectiveConfig.loss_names


def training_curves(log_rows: list) -> dict:
    """The series gate_curves draws, from the rows of a run's log.jsonl: {panel: {label: (steps,
    values)}} for the panels "w_img" (the fusion gate on each text's own image), "g_std" (the
    BDAM gate's per-channel spread over the batch; both train.gate_stats) and "weights" (each
    task's GradNorm weight w_k, keyed by task). Validation rows and absent keys are skipped."""
    def series(key):
        points = [(r["step"], r[key]) for r in log_rows if key in r]
        return tuple(map(list, zip(*points))) if points else None
    curves = {"w_img": {"W_img": series("w_img")}, "g_std": {"g std": series("g_std")},
              "weights": {task: series(f"w_{task}") for task in TASKS}}
    return {panel: {label: s for label, s in lines.items() if s} for panel, lines in curves.items()}


def gate_curves(log_rows: list, path, size=(13.5, 3.2), dpi: int = 100) -> Path | None:
    """Both gates and GradNorm's task weights over training (training_curves): W_img, the BDAM
    gate's spread, and each w_k on a log scale between the 0.2 and 5 lines that no weight should
    cross (README, Results). Where W_img settles decides whether the fusion reads the image.
    None when the log has none of them (a run logged before they were)."""
    curves = training_curves(log_rows)
    if not any(curves.values()):
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=size, dpi=dpi)
    panels = [("w_img", "fusion gate W_img (image share)", (0, 1)),
              ("g_std", "BDAM gate g, per-channel std over the batch", None),
              ("weights", "GradNorm task weights w_k (Eq. 5-6)", None)]
    for ax, (key, title, limits) in zip(axes, panels):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        if limits:
            ax.set_ylim(*limits)
        for label, (steps, values) in curves[key].items():
            ax.plot(steps, values, linewidth=1, label=label)
        if not curves[key]:
            ax.text(0.5, 0.5, "not in this run", ha="center", va="center", transform=ax.transAxes)
        elif key == "weights":
            ax.set_yscale("log")
            ax.set_yticks([0.2, 0.5, 1, 2, 5], ["0.2", "0.5", "1", "2", "5"])
            ax.minorticks_off()
            for bound in (0.2, 5.0):
                ax.axhline(bound, color="grey", linestyle="--", linewidth=0.8)
            ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return Path(path)
