"""Metrics against hand-worked examples and a naive per-query loop."""
import pytest
import torch

from evaluate import retrieval_metrics


def scores_from_orders(orders, num_gallery):
    """A similarity matrix whose row q ranks the gallery in the order orders[q]."""
    sim = torch.zeros(len(orders), num_gallery)
    for q, order in enumerate(orders):
        for position, g in enumerate(order):
            sim[q, g] = num_gallery - position
    return sim


def test_hand_worked_example_with_several_positives():
    gallery_pids = [1, 2, 1, 3, 2]
    query_pids = [1, 2, 3]
    orders = [
        [1, 0, 2, 3, 4],  # pid 1: hits at ranks 2, 3 -> AP (1/2 + 2/3) / 2, INP 2/3
        [4, 1, 0, 2, 3],  # pid 2: hits at ranks 1, 2 -> AP 1, INP 1
        [0, 1, 2, 4, 3],  # pid 3: hit at rank 5      -> AP 1/5, INP 1/5
    ]
    m = retrieval_metrics(scores_from_orders(orders, 5), query_pids, gallery_pids)
    assert m["R1"] == pytest.approx(100 / 3)
    assert m["R5"] == pytest.approx(100.0)
    assert m["R10"] == pytest.approx(100.0)
    assert m["mAP"] == pytest.approx(100 * ((1 / 2 + 2 / 3) / 2 + 1 + 1 / 5) / 3)
    assert m["mINP"] == pytest.approx(100 * (2 / 3 + 1 + 1 / 5) / 3)


def naive_metrics(sim, qp, gp):
    r1 = r5 = r10 = ap_sum = inp_sum = 0.0
    for q in range(sim.shape[0]):
        order = sorted(range(sim.shape[1]), key=lambda g: -float(sim[q, g]))
        hit_ranks = [r + 1 for r, g in enumerate(order) if gp[g] == qp[q]]
        r1 += hit_ranks[0] <= 1
        r5 += hit_ranks[0] <= 5
        r10 += hit_ranks[0] <= 10
        ap_sum += sum((i + 1) / r for i, r in enumerate(hit_ranks)) / len(hit_ranks)
        inp_sum += len(hit_ranks) / hit_ranks[-1]
    n = sim.shape[0] / 100
    return {"R1": r1 / n, "R5": r5 / n, "R10": r10 / n, "mAP": ap_sum / n, "mINP": inp_sum / n}


@pytest.mark.parametrize("chunk_size", [1, 7, 1000])
def test_matches_naive_loop_in_any_chunking(chunk_size):
    g = torch.Generator().manual_seed(0)
    gallery_pids = torch.randint(0, 8, (40,), generator=g)
    query_pids = gallery_pids[torch.randint(0, 40, (23,), generator=g)]
    sim = torch.randn(23, 40, generator=g)
    expected = naive_metrics(sim, query_pids.tolist(), gallery_pids.tolist())
    got = retrieval_metrics(sim, query_pids, gallery_pids, chunk_size=chunk_size)
    lazy = retrieval_metrics(lambda a, b: sim[a:b], query_pids, gallery_pids, chunk_size=chunk_size)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-4), key
        assert lazy[key] == pytest.approx(value, abs=1e-4), key


def test_query_without_positive_is_an_error():
    with pytest.raises(ValueError, match="no positive"):
        retrieval_metrics(torch.randn(2, 3), [0, 9], [0, 1, 2])
