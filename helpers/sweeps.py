"""The validation sweeps behind evaluate.choose_settings: stage 1's accuracy for each clothing
weight beta, stage 2's for each K and fusion weight a, every query and image embedded once."""
from __future__ import annotations

import torch

from helpers.metrics import retrieval_metrics
from helpers.retrieval import query_ranker, rerank


@torch.no_grad()
def clothing_weight_sweep(model, data, gallery: dict, tokenizer, device, batch_size: int, weights,
                          table_v: tuple | None) -> list[dict]:
    """Stage 1 on `data` (the validation split; `gallery` its embed_gallery) for each beta: the
    captions' R1, mAP and cross-outfit mAP, and, for the record, the Rank-1 of each of Table V's
    settings (`table_v`: evaluate.robustness_queries of the split). Each beta only re-adds."""
    cfg, pids, outfits = model.cfg, [g.pid for g in data.gallery], [g.outfit for g in data.gallery]
    ranker = query_ranker(model, gallery, tokenizer, cfg.max_text_len, device, 0, 0.0, batch_size, False)
    captions = ranker([q.caption for q in data.queries])
    built = table_v
    settings = {name: ranker(texts) for name, texts in built[0].items()} if built else {}
    rows = []
    for beta in weights if gallery["clo"] is not None else (0.0,):
        for ranked in (captions, *settings.values()):
            ranked.clothing_weight = beta
        m = retrieval_metrics(captions.stage1, [q.pid for q in data.queries], pids, 1024,
                              [q.outfit for q in data.queries], outfits)
        rows.append(dict(clothing_weight=beta, R1=m["R1"], mAP=m["mAP"],
                         cross_mAP=(m.get("cross_outfit") or {}).get("mAP"),
                         **{name: retrieval_metrics(r.stage1, built[1], pids)["R1"] for name, r in settings.items()}))
    return rows


@torch.no_grad()
def rerank_sweep(model, data, gallery: dict, tokenizer, device, clothing_weight: float, batch_size: int,
                 ks, weights) -> list[dict]:
    """Stage 2 on `data` (the validation split) for each K in `ks` and a in `weights`: the
    captions' Rank-1, mAP and cross-outfit mAP. The fusion scores the top max(ks) once."""
    pids, outfits = [g.pid for g in data.gallery], [g.outfit for g in data.gallery]
    captions = query_ranker(model, gallery, tokenizer, model.cfg.max_text_len, device, max(ks), clothing_weight,
                            batch_size, False, fusion_weight=1.0)([q.caption for q in data.queries])
    step = max(1, 4 * batch_size // max(ks))
    blocks = [captions.fusion_scores(s, min(s + step, len(data.queries))) for s in range(0, len(data.queries), step)]
    stage1, candidates, fused = (torch.cat(parts) for parts in zip(*blocks))  # (Q, G), (Q, Kmax), (Q, Kmax)
    base = stage1.gather(1, candidates)  # (Q, Kmax): s1 with its clothing term
    rows = []
    for k in ks:
        for a in weights:  # fused is the a = 1 score, so a's is base + a (fused - base)
            scores = base[:, :k] + a * (fused[:, :k] - base[:, :k])  # (Q, K)
            m = retrieval_metrics(rerank(stage1, candidates[:, :k], scores), [q.pid for q in data.queries],
                                  pids, 1024, [q.outfit for q in data.queries], outfits)
            rows.append(dict(rerank_k=k, fusion_weight=a, R1=m["R1"], mAP=m["mAP"],
                             cross_mAP=(m.get("cross_outfit") or {}).get("mAP")))
    return rows
