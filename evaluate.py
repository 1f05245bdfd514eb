"""Evaluation: retrieval metrics, two-stage retrieval, robustness settings, pictures.

Implements the evaluation of Sec. IV of the paper with the decisions of DESIGN section 3:

* the community protocol (IRRA, Jiang & Ye, CVPR 2023): every test caption is a query, every
  test image is in the gallery, all images of the query's identity are positives; Rank-1/5/10,
  mAP and mINP in percent (`retrieval_metrics`, computed in chunks of queries);
* stage 1 (dual encoder: gallery from images alone, queries from text alone, cosine) and
  stage 2 (the Mamba fusion module re-scores each query's top-K stage-1 candidates);
* Table V's robustness settings built from the generated descriptions of the test images:
  Standard (identity + clothing), Identity-Only, Clothes-Conflict (identity + the clothing of
  another test image, a fixed seeded derangement);
* Fig. 5's gate statistics, a ranked-list picture and the gate histograms.

    python evaluate.py                          # the newest run under runs/
    python evaluate.py --run runs/NAME          # a given run
    python evaluate.py --query "a tall man with short grey hair" --gallery DIR
"""
from __future__ import annotations

import torch


# ----------------------------------------------------------------------------------------------
# Metrics

def _rank_block(similarity: torch.Tensor, query_pids: torch.Tensor, gallery_pids: torch.Tensor):
    """Per-query statistics for one block of rows of the similarity matrix.

    Args:
        similarity: (Q, G) scores, higher is better.
        query_pids: (Q,) identity of each query; gallery_pids: (G,) identity of each image.
    Returns:
        first_hit: (Q,) 1-based rank of the first positive (G + 1 if the query has none),
        ap: (Q,) average precision, inp: (Q,) #positives / rank of the last positive.
    """
    order = similarity.argsort(dim=1, descending=True)                    # (Q, G)
    matches = gallery_pids[order] == query_pids[:, None]                  # (Q, G) bool
    ranks = torch.arange(1, matches.shape[1] + 1, device=matches.device)  # (G,) 1-based
    hits_so_far = matches.cumsum(dim=1)                                   # (Q, G)
    num_pos = matches.sum(dim=1)                                          # (Q,)
    if (num_pos == 0).any():
        raise ValueError(f"{int((num_pos == 0).sum())} queries have no positive in the gallery; "
                         "every query identity must have at least one gallery image")
    # precision at each positive, summed over positives, / #positives
    ap = (hits_so_far / ranks * matches).sum(dim=1) / num_pos             # (Q,)
    first_hit = matches.float().argmax(dim=1) + 1                         # (Q,)
    last_hit = matches.shape[1] - matches.flip(1).float().argmax(dim=1)   # (Q,) 1-based
    inp = num_pos / last_hit                                              # (Q,)
    return first_hit, ap, inp


def retrieval_metrics(similarity, query_pids, gallery_pids, chunk_size: int = 1024) -> dict:
    """Rank-1/5/10, mAP and mINP in percent (the IRRA protocol, DESIGN section 5).

    Args:
        similarity: (Q, G) tensor of query-gallery scores, or a callable
            `rows(start, end) -> (end - start, G)` that computes a block of rows on demand, so
            that a 20,000 x 20,000 evaluation never holds the whole matrix (nor its argsort).
        query_pids: (Q,) identities of the queries; gallery_pids: (G,) of the gallery images.
        chunk_size: queries ranked at a time.
    Returns:
        {"R1", "R5", "R10", "mAP", "mINP"}, each a float in [0, 100].
    """
    query_pids = torch.as_tensor(query_pids)
    gallery_pids = torch.as_tensor(gallery_pids)
    rows = similarity if callable(similarity) else (lambda a, b: similarity[a:b])
    first, ap, inp = [], [], []
    for start in range(0, len(query_pids), chunk_size):
        end = min(start + chunk_size, len(query_pids))
        block = rows(start, end)
        pids = query_pids[start:end].to(block.device)
        f, a, i = _rank_block(block.float(), pids, gallery_pids.to(block.device))
        first.append(f.cpu()), ap.append(a.cpu()), inp.append(i.cpu())
    first, ap, inp = torch.cat(first), torch.cat(ap), torch.cat(inp)
    metrics = {f"R{k}": 100.0 * (first <= k).float().mean().item() for k in (1, 5, 10)}
    metrics["mAP"] = 100.0 * ap.mean().item()
    metrics["mINP"] = 100.0 * inp.mean().item()
    return metrics
