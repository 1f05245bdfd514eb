"""The retrieval settings chosen on the validation split after training, never on the test split:
the clothing weight beta (stage 1), then stage 2's K and the fusion's share a of a candidate's
score (docs/design.md#1-honest-retrieval-retrieve-then-re-rank and
docs/design.md#5-text-side-only-identity-text-meets-the-identity-path). Each is chosen for
accuracy by the protocol's own measure (`selection_key`); the sweeps are printed and kept in
results.json. train.py calls `choose_clothing_weight` and `choose_rerank` at the end of a run.

Tests: pytest tests/test_evaluate.py tests/test_train.py
"""
from __future__ import annotations

import torch

from evaluate import DEFAULT_RERANK, retrieval_metrics, robustness_queries
from model import ModelConfig, ObjectiveConfig, T2IReID
from retrieval import embed_gallery, query_ranker, rerank

CLOTHING_WEIGHTS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0)  # the betas choose_from_sweep tries
RERANK_KS, FUSION_WEIGHTS = (5, 10, 20), (0.0, 0.25, 0.5, 0.75, 1.0)  # what choose_k_and_a tries


@torch.no_grad()
def clothing_weight_sweep(model: T2IReID, data, tokenizer, image_size, max_len: int, device, batch_size=64,
                          weights=CLOTHING_WEIGHTS, seed=0, progress=False) -> list[dict]:
    """Stage 1 on `data` (the validation split) for each beta in `weights`: the captions' R1, mAP
    and cross-outfit mAP, and, for the record, Table V's Rank-1 for each setting. One row of a
    model without a clothing stream (beta 0). Every query and image is embedded once; each beta
    only re-adds."""
    was_training = model.training
    model.eval()
    gallery = embed_gallery(model, [g.image_path for g in data.gallery], image_size, device, batch_size, progress)
    gallery_pids, gallery_outfits = [g.pid for g in data.gallery], [g.outfit for g in data.gallery]
    ranker = query_ranker(model, gallery, tokenizer, max_len, device, 0, 0.0, batch_size, progress)
    captions = ranker([q.caption for q in data.queries])
    built = robustness_queries(data.gallery, seed)
    settings = {name: ranker(texts) for name, texts in built[0].items()} if built else {}
    rows = []
    for beta in weights if gallery["clo"] is not None else (0.0,):
        row = dict(clothing_weight=beta)
        for ranked in (captions, *settings.values()):
            ranked.clothing_weight = beta
        m = retrieval_metrics(captions.stage1, [q.pid for q in data.queries], gallery_pids, 1024,
                              [q.outfit for q in data.queries], gallery_outfits)
        row.update(R1=m["R1"], mAP=m["mAP"], cross_mAP=(m.get("cross_outfit") or {}).get("mAP"))
        for name, ranked in settings.items():
            row[name] = retrieval_metrics(ranked.stage1, built[1], gallery_pids)["R1"]
        rows.append(row)
    model.train(was_training)
    return rows


def selection_key(rows: list[dict]) -> str:
    """The validation measure a setting is chosen by: mAP over the person's other outfits where
    the data knows outfits (what decoupling is for), else mAP (same-clothes data, CUHK-PEDES)."""
    return "cross_mAP" if all(row.get("cross_mAP") is not None for row in rows) else "mAP"


def choose_from_sweep(rows: list[dict]) -> float:
    """The beta of clothing_weight_sweep's rows with the best validation accuracy (selection_key),
    the smallest beta on a tie. Table V does not constrain it: Table V reports what the chosen
    model does with clothing text (a constraint made Table V hold by construction)."""
    key = selection_key(rows)
    return max(rows, key=lambda row: (row[key], -row["clothing_weight"]))["clothing_weight"]


@torch.no_grad()
def rerank_sweep(model: T2IReID, data, tokenizer, image_size, max_len: int, device, clothing_weight: float,
                 batch_size=64, ks=RERANK_KS, weights=FUSION_WEIGHTS, progress=False) -> list[dict]:
    """Stage 2 on `data` (the validation split) for each K in `ks` and fusion weight a in
    `weights`: Rank-1, mAP and cross-outfit mAP of the captions. The fusion scores the top max(ks)
    of each query once; a smaller K re-ranks the first K of those."""
    was_training = model.training
    model.eval()
    gallery = embed_gallery(model, [g.image_path for g in data.gallery], image_size, device, batch_size, progress)
    gallery_pids, gallery_outfits = [g.pid for g in data.gallery], [g.outfit for g in data.gallery]
    ranker = query_ranker(model, gallery, tokenizer, max_len, device, max(ks), clothing_weight, batch_size,
                          progress, fusion_weight=1.0)
    captions = ranker([q.caption for q in data.queries])
    step = max(1, 4 * batch_size // max(ks))
    blocks = [captions.fusion_scores(s, min(s + step, len(data.queries))) for s in range(0, len(data.queries), step)]
    stage1, candidates, fused = (torch.cat(parts) for parts in zip(*blocks))  # (Q, G), (Q, Kmax), (Q, Kmax)
    base = stage1.gather(1, candidates)  # (Q, Kmax): s1 with its clothing term
    rows = []
    for k in ks:
        for a in weights:  # fused is the a = 1 score, so a's is base + a (fused - base)
            scores = base[:, :k] + a * (fused[:, :k] - base[:, :k])  # (Q, K)
            m = retrieval_metrics(rerank(stage1, candidates[:, :k], scores), [q.pid for q in data.queries],
                                  gallery_pids, 1024, [q.outfit for q in data.queries], gallery_outfits)
            rows.append(dict(rerank_k=k, fusion_weight=a, R1=m["R1"], mAP=m["mAP"],
                             cross_mAP=(m.get("cross_outfit") or {}).get("mAP")))
    model.train(was_training)
    return rows


def choose_k_and_a(rows: list[dict]) -> tuple[int, float]:
    """(K, a) of rerank_sweep's rows: the best validation Rank-1 -- what re-ranking the top K is
    for -- among the settings whose selection_key measure is no lower than stage 1's (a = 0);
    ties to the smaller a, then the smaller K."""
    key = selection_key(rows)
    floor = max((row[key] for row in rows if row["fusion_weight"] == 0), default=float("-inf"))
    fair = [row for row in rows if row[key] >= floor - 1e-9]
    best = max(fair, key=lambda row: (row["R1"], -row["fusion_weight"], -row["rerank_k"]))
    return best["rerank_k"], best["fusion_weight"]


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


def choose_clothing_weight(model: T2IReID, val, tokenizer, mcfg: ModelConfig, ocfg: ObjectiveConfig, device,
                           batch_size: int, seed: int):
    """beta: the config's when >= 0; else the one with the best validation accuracy
    (choose_from_sweep), or 0 without a validation split. Returns (beta, the sweep's rows or None)."""
    if ocfg.clothing_weight >= 0:
        return ocfg.clothing_weight, None
    if val is None:  # no validation split (train.load_splits): the test split is never used to choose
        return 0.0, None
    rows = clothing_weight_sweep(model, val, tokenizer, mcfg.image_size, mcfg.max_text_len, device, batch_size,
                                 seed=seed)
    beta = choose_from_sweep(rows)
    print(sweep_report(rows, beta))
    return beta, rows


def choose_rerank(model: T2IReID, val, tokenizer, mcfg: ModelConfig, ocfg: ObjectiveConfig, device,
                  batch_size: int, beta: float):
    """K and a: the config's where >= 0, else chosen on the validation split by choose_k_and_a
    (K 10, a 1 without one). Returns (K, a, the sweep's rows or None)."""
    fixed_k = ocfg.rerank_k if ocfg.rerank_k > 0 else None
    fixed_a = ocfg.fusion_weight if ocfg.fusion_weight >= 0 else None
    if model.fusion is None or val is None or (fixed_k and fixed_a is not None):
        return fixed_k or DEFAULT_RERANK, 1.0 if fixed_a is None else fixed_a, None
    rows = rerank_sweep(model, val, tokenizer, mcfg.image_size, mcfg.max_text_len, device, beta, batch_size,
                        ks=(fixed_k,) if fixed_k else RERANK_KS,
                        weights=(fixed_a,) if fixed_a is not None else FUSION_WEIGHTS)
    k, a = choose_k_and_a(rows)
    print(rerank_report(rows, (k, a)))
    return k, a, rows
