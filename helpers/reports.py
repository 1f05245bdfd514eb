"""What evaluate.py prints: metric tables, Table V's ratios, the gates' summaries and the
validation sweeps of the retrieval settings, each as text."""
from __future__ import annotations

import torch

def gate_summary(values: list, channels: torch.Tensor | None = None, bins: int = 40) -> dict | None:
    """mean, std, count and a histogram over [0, 1] of gate values (sigmoid / softmax outputs).

    channels (N, D), the gate of each image per channel: adds channel_std, the standard deviation
    over the N images of each channel's gate, averaged over the D channels. The per-image mean
    over channels can stay put while every channel moves from image to image; channel_std is
    0 only for a gate that does not look at the image."""
    if not values:
        return None
    values = torch.cat(values).float()
    hist = torch.histc(values, bins=bins, min=0.0, max=1.0)
    out = dict(mean=values.mean().item(), std=values.std().item() if len(values) > 1 else 0.0,
               count=len(values), hist=[int(c) for c in hist])
    if channels is not None and len(channels) > 1:
        out["channel_std"] = channels.float().std(0).mean().item()
    return out



COLUMNS = ("R1", "R5", "R10", "mAP", "mINP")


def table(title: str, rows: list) -> str:
    """rows of (label, metrics dict or None) -> an aligned text table."""
    width = max(len(label) for label, _ in rows) + 2
    lines = [title, " " * width + "".join(f"{c:>8s}" for c in COLUMNS)]
    for label, m in rows:
        if m is not None:
            lines.append(f"{label:{width}s}" + "".join(f"{m[c]:8.2f}" for c in COLUMNS))
    return "\n".join(lines)


def robustness_ratios(robustness: dict) -> dict:
    """Table V's ratios: Identity-Only and Clothes-Conflict Rank-1 over Standard's, per stage."""
    out = {}
    for name in ("Identity-Only", "Clothes-Conflict"):
        for stage in ("stage1", "stage2"):
            standard, other = robustness["Standard"][stage], robustness[name][stage]
            if standard and other and standard["R1"] > 0:
                out[(name, stage)] = other["R1"] / standard["R1"]
    return out


def report(result: dict) -> str:
    """The printed summary of evaluate_model's result."""
    k, stages = result["rerank_k"], ("stage1", "stage2")
    a = result.get("fusion_weight", 1.0)
    rows = [("stage 1 (dual encoder)", result["stage1"]), (f"stage 2 (fusion, top {k}, a {a:g})", result["stage2"])]
    rows += [(f"{label}, other outfits", (m or {}).get("cross_outfit")) for label, m in rows]
    beta = result.get("clothing_weight", 0.0)
    out = [table(f"{result['dataset']}: {result['num_queries']} queries, {result['num_gallery']} images "
                 f"(clothing weight {beta:g})", rows)]
    for key, what in (("table_v_as_shipped", f"as shipped: the query split, beta {beta:g}"),
                      ("table_v_whole_text", "whole text: each query whole on the identity path, beta 0")):
        if not result.get(key):
            continue
        rows = [(f"{name:17s} stage {s[-1]}", r[s]) for name, r in result[key].items() for s in stages]
        rows += [(f"{name:17s} stage {s[-1]}, other outfits", (r[s] or {}).get("cross_outfit"))
                 for name, r in result[key].items() for s in stages]
        out.append(table(f"Table V, {what}", rows))
        out.append("Rank-1 kept of Standard's: " + "; ".join(
            f"{name} stage {s[-1]} {100 * ratio:.0f}%" for (name, s), ratio in robustness_ratios(result[key]).items()))
    gates = [(name, result["gates"][key]) for key, name in (("bdam", "BDAM gate g"), ("fusion", "fusion gate W_img"))]
    lines = [f"{name:18s} mean {g['mean']:.3f} +- {g['std']:.3f} over {g['count']} values (Fig. 5)"
             + (f"; per channel, std over images {g['channel_std']:.3f}" if "channel_std" in g else "")
             for name, g in gates if g is not None]
    reliance = result.get("fusion_image_reliance")
    if reliance:
        lines.append(f"{'fusion vs image':18s} each top-{reliance['k']} candidate scored with the next one's image "
                     f"tokens: scores move {reliance['change']:.3f} of their spread, rank correlation "
                     f"{reliance['spearman']:.3f} (0 and 1: the fusion ignores the image)")
    out.append("\n".join(lines))
    return "\n\n".join(out + [f"note: {n}" for n in result["notes"]])



def rerank_report(rows: list[dict], chosen: tuple[int, float]) -> str:
    """rerank_sweep's rows as printed lines, the chosen (K, a) marked."""
    lines = ["stage 2 on the validation split: K candidates, a = the fusion's share of their score"]
    for row in rows:
        cross = f"{row['cross_mAP']:6.2f}" if row.get("cross_mAP") is not None else "     -"
        lines.append(f"  K {row['rerank_k']:3d}  a {row['fusion_weight']:4.2f}: R1 {row['R1']:5.2f}  mAP {row['mAP']:5.2f}"
                     f"  other outfits mAP {cross}" + ("   <- chosen" if (row["rerank_k"], row["fusion_weight"]) == chosen
                                                        else ""))
    return "\n".join(lines)


def sweep_report(rows: list[dict], chosen: float) -> str:
    """clothing_weight_sweep's rows as printed lines, the chosen beta marked."""
    lines = ["clothing weight beta on the validation split (stage 1; Table V Rank-1 of each setting, for the record):"]
    for row in rows:
        cross = f"{row['cross_mAP']:6.2f}" if row.get("cross_mAP") is not None else "     -"
        settings = "  ".join(f"{name} {row[name]:5.1f}" for name in ("Standard", "Identity-Only", "Clothes-Conflict")
                             if name in row)
        lines.append(f"  beta {row['clothing_weight']:4.2f}: R1 {row['R1']:5.2f}  mAP {row['mAP']:5.2f}  other "
                     f"outfits mAP {cross}  {settings}" + ("   <- chosen" if row["clothing_weight"] == chosen else ""))
    return "\n".join(lines)


def example_rankings(rows, texts: list, query_pids: list, gallery: list, count: int, seed: int) -> dict:
    """`count` seeded queries with their top-10 paths and whether each is of the query's identity."""
    pick = sorted(torch.randperm(len(texts), generator=torch.Generator().manual_seed(seed))[:count].tolist())
    out = dict(queries=[], paths=[], correct=[])
    for q in pick:
        top = rows(q, q + 1)[0].topk(min(10, len(gallery))).indices.tolist()
        out["queries"].append(texts[q])
        out["paths"].append([gallery[g].image_path for g in top])
        out["correct"].append([gallery[g].pid == query_pids[q] for g in top])
    return out


def gate_stats(out: dict) -> dict:
    """The gates of Fig. 5 on this batch: g_std, the BDAM gate's per-channel spread over the
    images (0: the same g for every image), and w_img, the fusion gate's mean W_img (near 0: the
    fusion reads the text alone)."""
    stats = {}
    if out.get("bdam_gate") is not None and len(out["bdam_gate"]) > 1:
        stats["g_std"] = out["bdam_gate"].detach().float().std(0).mean().item()
    if out.get("fusion_gate") is not None:
        stats["w_img"] = out["fusion_gate"].float().mean().item()
    return stats
