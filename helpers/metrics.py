"""Retrieval metrics of the community protocol (IRRA, Jiang & Ye, CVPR 2023): Rank-1/5/10, mAP
and mINP in percent, computed in blocks of queries; and, where the dataset knows outfits, the
cloth-changing protocol of PRCC and LTCC on the same rankings. Checked against hand-worked
rankings in tests/test_evaluate.py; `metrics_of_both_stages` ranks with both stages of a
helpers.retrieval.TwoStage."""
from __future__ import annotations

import torch
from tqdm import tqdm


def _rank_block(similarity: torch.Tensor, query_pids: torch.Tensor, gallery_pids: torch.Tensor,
                excluded: torch.Tensor | None = None):
    """Per-query statistics for one block of rows of the similarity matrix.

    Args:
        similarity: (Q, G) scores, higher is better.
        query_pids: (Q,) identity of each query; gallery_pids: (G,) identity of each image.
        excluded: (Q, G) bool or None: images left out of each query's ranking altogether (the
            cloth-changing protocol leaves out the query's own outfit); the others keep their order.
    Returns:
        first_hit: (Q,) 1-based rank of the first positive among the images kept,
        ap: (Q,) average precision, inp: (Q,) #positives / rank of the last positive,
        has_positive: (Q,) bool (the other three are meaningless where it is False).
    """
    order = similarity.argsort(dim=1, descending=True)                    # (Q, G)
    matches = gallery_pids[order] == query_pids[:, None]                  # (Q, G) bool
    kept = torch.ones_like(matches) if excluded is None else ~excluded.gather(1, order)
    matches = matches & kept
    ranks = kept.cumsum(dim=1).clamp_min(1)                               # (Q, G) 1-based, kept images
    hits_so_far = matches.cumsum(dim=1)                                   # (Q, G)
    num_pos = matches.sum(dim=1)                                          # (Q,)
    # precision at each positive, summed over positives, / #positives
    ap = (hits_so_far / ranks * matches).sum(dim=1) / num_pos.clamp_min(1)  # (Q,)
    first = matches.float().argmax(dim=1, keepdim=True)                   # (Q, 1) column
    last = matches.shape[1] - 1 - matches.flip(1).float().argmax(dim=1, keepdim=True)
    first_hit, last_hit = ranks.gather(1, first)[:, 0], ranks.gather(1, last)[:, 0]  # (Q,)
    return first_hit, ap, num_pos / last_hit, num_pos > 0


def _summary(first: torch.Tensor, ap: torch.Tensor, inp: torch.Tensor) -> dict:
    metrics = {f"R{k}": 100.0 * (first <= k).float().mean().item() for k in (1, 5, 10)}
    metrics["mAP"] = 100.0 * ap.mean().item()
    metrics["mINP"] = 100.0 * inp.mean().item()
    return metrics


def retrieval_metrics(similarity, query_pids, gallery_pids, chunk_size: int = 1024,
                      query_outfits=None, gallery_outfits=None) -> dict:
    """Rank-1/5/10, mAP and mINP in percent (the IRRA protocol).

    Args:
        similarity: (Q, G) tensor of query-gallery scores, or a callable
            `rows(start, end) -> (end - start, G)` that computes a block of rows on demand, so
            that a 20,000 x 20,000 evaluation never holds the whole matrix (nor its argsort).
        query_pids: (Q,) identities of the queries; gallery_pids: (G,) of the gallery images.
        chunk_size: queries ranked at a time.
        query_outfits, gallery_outfits: (Q,) and (G,) outfit (clothes) ids, where the dataset
            knows them: the same rows are then also ranked by the cloth-changing protocol of
            PRCC and LTCC -- the images of the query's person in the query's own outfit leave the
            gallery, and only the person's *other* outfits count -- as "cross_outfit".
    Returns:
        {"R1", "R5", "R10", "mAP", "mINP"}, each a float in [0, 100]; with outfits, also
        "cross_outfit": the same five and "queries" (those whose person has another outfit in
        the gallery; the others are left out), or None when no query has one.
    """
    query_pids = torch.as_tensor(query_pids)
    gallery_pids = torch.as_tensor(gallery_pids)
    outfits = query_outfits is not None and gallery_outfits is not None
    if outfits and (None in list(query_outfits) or None in list(gallery_outfits)):
        outfits = False  # an outfit the dataset does not know: no cloth-changing protocol
    if outfits:
        query_outfits, gallery_outfits = torch.as_tensor(query_outfits), torch.as_tensor(gallery_outfits)
    rows = similarity if callable(similarity) else (lambda a, b: similarity[a:b])
    standard, cross = [], []
    for start in range(0, len(query_pids), chunk_size):
        end = min(start + chunk_size, len(query_pids))
        block = rows(start, end).float()
        pids, gallery = query_pids[start:end].to(block.device), gallery_pids.to(block.device)
        *stats, has = _rank_block(block, pids, gallery)
        if not has.all():
            raise ValueError(f"{int((~has).sum())} queries have no positive in the gallery; "
                             "every query identity must have at least one gallery image")
        standard.append([s.cpu() for s in stats])
        if outfits:
            own = (pids[:, None] == gallery) & (query_outfits[start:end, None] == gallery_outfits[None, :]).to(block.device)
            *stats, has = _rank_block(block, pids, gallery, excluded=own)
            cross.append([s[has].cpu() for s in stats])
    metrics = _summary(*(torch.cat(column) for column in zip(*standard)))
    if outfits:
        first, ap, inp = (torch.cat(column) for column in zip(*cross))
        metrics["cross_outfit"] = {**_summary(first, ap, inp), "queries": len(first)} if len(first) else None
    return metrics


def metrics_of_both_stages(ranker, pids, gallery_pids, batch_size=64, progress=True, gate_sink=None,
                           outfits=None, gallery_outfits=None):
    """(stage-1 metrics, stage-2 metrics or None when ranker.k is 0), each with "cross_outfit"
    where the outfits are known (retrieval_metrics). `gate_sink`, a list, gets the mean W_img of
    every pair the fusion module scores (Fig. 5)."""
    stage1 = retrieval_metrics(ranker.stage1, pids, gallery_pids, 1024, outfits, gallery_outfits)
    if not ranker.k:
        return stage1, None
    ranker.gates = gate_sink
    bar = tqdm(total=len(pids), desc="stage 2", disable=not progress, leave=False)

    def rows(start, end):  # the slow part on a CPU, hence the progress bar
        bar.update(end - start)
        return ranker.stage2(start, end)  # (n, G)
    # 4 x batch_size pairs per fusion pass: half of what a training step scores, with no gradients
    queries_per_pass = max(1, 4 * batch_size // ranker.k)
    try:
        return stage1, retrieval_metrics(rows, pids, gallery_pids, queries_per_pass, outfits, gallery_outfits)
    finally:
        bar.close()
        ranker.gates = None
