"""evaluate.py, helpers/retrieval.py and helpers/pictures.py: metrics against hand-worked examples and a naive
per-query loop, the query split on hand-worked captions, the two stages against the model
scoring each pair, the pictures, the command line."""
import pytest
import torch

from helpers.metrics import retrieval_metrics


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


def test_cross_outfit_hand_worked_example():
    # person 1 has outfits 0 (images 0, 2) and 1 (images 4, 5); person 2 has outfit 0 (images 1, 3)
    gallery_pids, gallery_outfits = [1, 2, 1, 2, 1, 1], [0, 0, 0, 0, 1, 1]
    query_pids, query_outfits = [1, 1, 2], [0, 1, 0]
    orders = [
        [0, 1, 4, 2, 3, 5],  # outfit 0 of person 1: 0 and 2 leave -> 1, 4, 3, 5: hits at ranks 2, 4
        [4, 0, 5, 1, 2, 3],  # outfit 1: 4 and 5 leave -> 0, 1, 2, 3: hits at ranks 1, 3
        [1, 0, 3, 2, 4, 5],  # person 2 has no other outfit: left out of the cross-outfit numbers
    ]
    m = retrieval_metrics(scores_from_orders(orders, 6), query_pids, gallery_pids,
                          query_outfits=query_outfits, gallery_outfits=gallery_outfits)
    cross = m["cross_outfit"]
    assert cross["queries"] == 2
    assert cross["R1"] == pytest.approx(50.0) and cross["R5"] == pytest.approx(100.0)
    assert cross["mAP"] == pytest.approx(100 * ((1 / 2 + 2 / 4) / 2 + (1 + 2 / 3) / 2) / 2)
    assert cross["mINP"] == pytest.approx(100 * (2 / 4 + 2 / 3) / 2)
    # the standard numbers, from the same rows, count every image
    assert m["R1"] == pytest.approx(100.0)
    assert m["mAP"] == pytest.approx(100 * ((1 + 2 / 3 + 3 / 4 + 4 / 6) / 4 + (3 + 4 / 5) / 4 + (1 + 2 / 3) / 2) / 3)
    # one outfit per person (same-clothes): nothing to rank across outfits
    same = retrieval_metrics(scores_from_orders(orders, 6), query_pids, gallery_pids,
                             query_outfits=[0, 0, 0], gallery_outfits=[0] * 6)
    assert same["cross_outfit"] is None
    # an outfit the dataset does not know: no cross-outfit numbers at all
    unknown = retrieval_metrics(scores_from_orders(orders, 6), query_pids, gallery_pids,
                                query_outfits=[0, None, 0], gallery_outfits=gallery_outfits)
    assert "cross_outfit" not in unknown


@pytest.mark.parametrize("chunk_size", [1, 5, 100])
def test_cross_outfit_matches_naive_loop_over_a_pruned_gallery(chunk_size):
    g = torch.Generator().manual_seed(3)
    gallery_pids, gallery_outfits = torch.randint(0, 5, (30,), generator=g), torch.randint(0, 3, (30,), generator=g)
    pick = torch.randint(0, 30, (17,), generator=g)
    query_pids, query_outfits = gallery_pids[pick], gallery_outfits[pick]
    sim = torch.randn(17, 30, generator=g)
    got = retrieval_metrics(sim, query_pids, gallery_pids, chunk_size, query_outfits, gallery_outfits)["cross_outfit"]
    want, count = {k: 0.0 for k in ("R1", "R5", "R10", "mAP", "mINP")}, 0
    for q in range(17):  # the naive protocol: delete the own-outfit images, then rank what is left
        keep = [j for j in range(30) if not (gallery_pids[j] == query_pids[q] and gallery_outfits[j] == query_outfits[q])]
        if not any(gallery_pids[j] == query_pids[q] for j in keep):
            continue
        one = naive_metrics(sim[q:q + 1, keep], query_pids[q:q + 1].tolist(), gallery_pids[keep].tolist())
        want = {k: v + one[k] for k, v in want.items()}
        count += 1
    assert got["queries"] == count > 0
    for key, value in want.items():
        assert got[key] == pytest.approx(value / count, abs=1e-4), key


# ----------------------------------------------------------------------------------------------
# Two-stage retrieval, robustness settings, pictures, runs

import dataclasses  # noqa: E402
import json  # noqa: E402
from pathlib import Path  # noqa: E402

from PIL import Image  # noqa: E402

import data  # noqa: E402
from helpers import lexicon  # noqa: E402
import mamba_triton  # noqa: E402
from evaluate import choose_from_sweep as choose_clothing_weight, choose_k_and_a as choose_rerank  # noqa: E402
from evaluate import (DEFAULT_RERANK, RetrievalConfig, RunError, derangement, evaluate_model,  # noqa: E402
                      load_run, main, robustness_metrics, robustness_queries)
from helpers.reports import gate_summary, report, robustness_ratios  # noqa: E402
from helpers.pictures import (FRAME, FRAME_COLOURS, GAP, TEXT_WIDTH, THUMB, gate_curves, gate_histograms,  # noqa: E402
                      ranked_list_picture, read_log, running_mean, training_curves, training_figure,
                      training_picture)
from helpers import retrieval  # noqa: E402
from helpers.retrieval import TwoStage, embed_gallery, embed_texts, fusion_image_reliance, query_ranker, rerank  # noqa: E402
from helpers.encoders import load_tokenizer  # noqa: E402
from losses import LossConfig  # noqa: E402
from model import ModelConfig, T2IReID  # noqa: E402


@pytest.fixture(autouse=True)
def scan_reference(monkeypatch):
    """The PyTorch selective scan: the Triton kernels in the interpreter would take minutes."""
    monkeypatch.setattr(mamba_triton, "_INTERPRET", False)


def tiny_cfg(**overrides) -> ModelConfig:
    """A one-layer everything on 64 x 32 images (P = 8), random BERT on the real vocabulary."""
    shape = dict(image_size=(64, 32), vision_layers=1, vision_width=32, vision_heads=2, text_model="",
                 text_layers=1, text_width=32, text_heads=2, bdam_width=32, bdam_heads=2, bdam_depth=1,
                 fusion_width=16, fusion_layers=1, embed_dim=16, dropout=0.0)
    return ModelConfig.small(**{**shape, **overrides})


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return T2IReID(tiny_cfg()).eval()


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


@pytest.fixture(scope="module")
def test_split(tiny_synth):
    """The tiny SynthPEDES test split, with the generator's identity and clothing descriptions."""
    ann = data.read_annotations("synth", tiny_synth)
    texts = {str((ann.image_dir / r["file_path"]).resolve()): r for r in ann.records}
    dataset = data.load_dataset("synth", tiny_synth)
    gallery = [dataclasses.replace(g, identity=texts[g.image_path]["identity_text"],
                                   clothing=texts[g.image_path]["clothing_text"]) for g in dataset.gallery]
    return dataclasses.replace(dataset, gallery=gallery)


def test_rerank_matches_a_naive_merge():
    g = torch.Generator().manual_seed(1)
    stage1 = torch.rand(6, 15, generator=g) * 2 - 1
    k = 4
    candidates = stage1.topk(k, dim=1).indices
    fusion = torch.rand(6, k, generator=g) * 2 - 1
    merged = rerank(stage1, candidates, fusion).argsort(dim=1, descending=True)
    for q in range(6):
        by_fusion = [int(candidates[q, i]) for i in fusion[q].argsort(descending=True)]
        rest = [int(i) for i in stage1[q].argsort(descending=True) if int(i) not in by_fusion]
        assert merged[q].tolist() == by_fusion + rest


@pytest.mark.parametrize("pids", [[0, 0, 1, 1, 2, 2, 2], [5, 5, 5, 5, 5, 6], [3, 4], list(range(9))])
def test_derangement_has_no_fixed_point_is_seeded_and_avoids_the_same_identity(pids):
    partner = derangement(pids, seed=3)
    assert sorted(partner) == list(range(len(pids)))  # a permutation
    assert all(partner[i] != i for i in range(len(pids)))
    assert derangement(pids, seed=3) == partner
    if max(pids.count(p) for p in pids) <= len(pids) / 2:
        assert all(pids[partner[i]] != pids[i] for i in range(len(pids)))
    if len(pids) > 3:
        assert any(derangement(pids, seed=s) != partner for s in range(4, 10))
    with pytest.raises(ValueError):
        derangement([1], seed=0)


def test_robustness_queries_are_built_from_the_descriptions():
    gallery = [data.GalleryImage(f"{i}.png", pid, f"id{i}", f"clo{i}") for i, pid in enumerate([7, 7, 8, 9])]
    gallery[3] = dataclasses.replace(gallery[3], outfit=2)
    settings, pids, outfits = robustness_queries(gallery, seed=0)
    partner = derangement([7, 7, 8, 9], seed=0)
    assert outfits == [None, None, None, 2]  # each query's own outfit: the image it describes
    assert settings["Standard"] == ["id0 clo0", "id1 clo1", "id2 clo2", "id3 clo3"]
    assert settings["Identity-Only"] == ["id0", "id1", "id2", "id3"]
    assert settings["Clothes-Conflict"] == [f"id{i} clo{partner[i]}" for i in range(4)]
    assert pids == [7, 7, 8, 9]
    gallery[2] = dataclasses.replace(gallery[2], clothing=None)   # left out, not the whole table
    settings, pids, _ = robustness_queries(gallery, seed=0)
    assert settings["Identity-Only"] == ["id0", "id1", "id3"] and pids == [7, 7, 9]
    gallery = [dataclasses.replace(g, identity=None) for g in gallery[1:]] + gallery[:1]
    assert robustness_queries(gallery, seed=0) is None            # one described image: no table


SPLITS = [  # (query, identity part, clothing part, names an identity trait), worked by hand
    ("This is a tall man with short grey hair. He wears a red jacket and blue jeans.",
     "This is a tall man with short grey hair.", "The person wears a red jacket and blue jeans.", True),
    # a real annotator's run-on, lower case, with typos ("blak", "wering", "jaket", "jeens")
    ("a man with short blak hair wering a red jaket and blue jeens",
     "A man with short blak hair.", "Wering a red jaket and blue jeens.", True),
    ("young guy, glasses, grey hoodie, backpack", "Young guy, glasses.", "Grey hoodie, backpack.", True),
    ("A tall woman.", "A tall woman.", "", True),  # no clothing named
    ("a red jacket and jeans", "A person.", "A red jacket and jeans.", False),  # no identity trait
    ("someone in a red jacket and jeans walking down the street", "A person.",
     "Someone in a red jacket and jeans.", False),
]


@pytest.mark.parametrize("query, identity, clothing, named", SPLITS)
def test_split_query_on_hand_worked_captions(query, identity, clothing, named):
    assert lexicon.split_query(query) == (identity, clothing, named)


@pytest.mark.parametrize("query", ["", "   ", "?!.", "--"])
def test_a_query_without_words_is_a_clear_error(query):
    with pytest.raises(ValueError, match="has no words"):
        lexicon.split_query(query)


def test_clothing_weight_rule_on_made_up_sweeps():
    """The best validation mAP across outfits where outfits are known, else the caption mAP;
    Table V's ratios (kept in the rows for the record) do not constrain it; ties to the smaller beta."""
    def row(beta, m, cross, standard, identity_only, conflict):
        return dict(clothing_weight=beta, R1=0.0, mAP=m, cross_mAP=cross, Standard=standard,
                    **{"Identity-Only": identity_only, "Clothes-Conflict": conflict})
    rows = [row(0.0, 35, 31, 40, 40, 40), row(0.1, 41, 30, 44, 40, 39.7), row(0.2, 45, 28, 60, 40, 30)]
    assert choose_clothing_weight(rows) == 0.0  # clothing only costs the other outfits
    same_clothes = [{**r, "cross_mAP": None} for r in rows]
    assert choose_clothing_weight(same_clothes) == 0.2  # Table V falls to 50%, and that is reported, not avoided
    assert choose_clothing_weight([row(0.0, 30, 20, 1, 1, 1), row(0.3, 30, 20, 1, 1, 1)]) == 0.0  # a tie


def test_rerank_rule_on_made_up_sweeps():
    """(K, a): the best validation Rank-1 among the settings that keep stage 1's accuracy measure."""
    def row(k, a, r1, cross):
        return dict(rerank_k=k, fusion_weight=a, R1=r1, mAP=30.0, cross_mAP=cross)
    rows = [row(5, 0.0, 40, 25), row(5, 0.5, 44, 25.2), row(10, 0.0, 40, 25), row(10, 0.5, 47, 24.9),
            row(10, 1.0, 45, 25.5)]
    assert choose_rerank(rows) == (10, 1.0)  # 47 would cost the other outfits
    assert choose_rerank([row(5, 0.0, 40, 25), row(5, 0.5, 30, 24)]) == (5, 0.0)  # a fusion that hurts: a = 0
    assert choose_rerank([{**r, "cross_mAP": None} for r in rows]) == (10, 0.5)  # same-clothes: mAP ties


def test_table_v_can_fail_in_both_protocols(tiny_model, test_split, monkeypatch):
    """A text encoder that reads every word (a bag of random word vectors) against images that
    carry their clothes: a conflicting clothing description then costs Rank-1 in both protocols --
    as shipped through the clothing term (beta 1), whole text through the identity path itself --
    and, as shipped with beta 0, the split keeps the clothing words out."""
    g, vectors = torch.Generator().manual_seed(0), {}

    def bag(model, tokenizer, texts, max_len, device, batch_size=64, progress=True, clothing=False):
        rows = [sum(vectors.setdefault(w, torch.randn(64, generator=g)) for w in lexicon.WORD_RE.findall(t.lower()))
                for t in texts]
        emb = torch.nn.functional.normalize(torch.stack(rows), dim=-1)
        return emb, emb.clone()
    monkeypatch.setattr(retrieval, "embed_texts", bag)
    gallery = test_split.gallery
    identity, clothes, whole = (bag(None, None, [text(x) for x in gallery], 0, "cpu")[0] for text in
                                (lambda x: x.identity, lambda x: x.clothing, lambda x: f"{x.identity} {x.clothing}"))
    ratio = {}
    for name, emb, beta, split in (("as shipped", identity, 1.0, True), ("whole text", whole, 0.0, False),
                                   ("as shipped, beta 0", identity, 0.0, True)):
        ranker = query_ranker(tiny_model, dict(emb=emb, clo=clothes, tokens=None), None, 48, "cpu", 0, beta,
                              progress=False, split=split)
        table = robustness_metrics(ranker, gallery, None, 0, [], progress=False)
        ratio[name] = robustness_ratios(table)[("Clothes-Conflict", "stage1")]
    assert ratio["as shipped"] < 0.9 and ratio["whole text"] < 0.9, ratio
    assert ratio["as shipped, beta 0"] > max(ratio["as shipped"], ratio["whole text"]), ratio


def test_two_stage_adds_the_clothing_part_and_ranks_clothing_only_queries_by_it():
    """Hand-made embeddings: stage 1 = identity cosine + beta * clothing cosine; a query with no
    identity trait scores by its clothing alone, and stage 2 leaves its order alone."""
    g = torch.Generator().manual_seed(0)
    unit = lambda *shape: torch.nn.functional.normalize(torch.randn(*shape, generator=g), dim=-1)  # noqa: E731
    q_id, q_clo, g_id, g_clo = unit(3, 4), unit(3, 4), unit(6, 4), unit(6, 4)
    q_clo[1] = 0  # query 1 names no clothing
    only = torch.tensor([False, False, True])  # query 2 names no identity trait

    class Fusion:  # stands in for T2IReID.pair_score: a fixed score per candidate image
        def pair_score(self, tokens, texts, emb):
            return tokens[:, 0, 0], tokens[:, 0]
    tokens = torch.linspace(-1, 1, 6)[:, None, None].expand(6, 2, 3).clone()
    ranker = TwoStage(Fusion(), q_id, torch.zeros(3, 5), g_id, tokens, k=4, query_clo=q_clo, gallery_clo=g_clo,
                      clothing_weight=0.3, clothing_only=only)
    s1 = ranker.stage1(0, 3)
    want = q_id @ g_id.T + 0.3 * (q_clo @ g_clo.T)
    torch.testing.assert_close(s1[:2], want[:2])
    torch.testing.assert_close(s1[1], (q_id @ g_id.T)[1])  # nothing named: the identity alone
    torch.testing.assert_close(s1[2], (q_clo @ g_clo.T)[2])  # clothing only
    s2 = ranker.stage2(0, 3)
    assert s2[2].argsort(descending=True).tolist() == s1[2].argsort(descending=True).tolist()
    top = s1[0].topk(4).indices  # query 0: fusion score + beta * clothing cosine decides its top 4
    fused = tokens[top, 0, 0] + 0.3 * (q_clo[0] @ g_clo[top].T)
    assert s2[0].argsort(descending=True)[:4].tolist() == top[fused.argsort(descending=True)].tolist()


def test_gallery_cache_and_stage2_order_match_the_model_scoring_each_pair(tiny_model, tokenizer, test_split):
    model, paths = tiny_model, [g.image_path for g in test_split.gallery]
    images = torch.stack([data.eval_transform((64, 32))(data.load_image(p)) for p in paths])
    gallery = embed_gallery(model, paths, (64, 32), "cpu", batch_size=7, progress=False)
    with torch.no_grad():
        once = model.encode_images(images)
        torch.testing.assert_close(gallery["emb"], once["emb"], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(gallery["tokens"].float(), once["tokens"], atol=1e-2, rtol=1e-2)
        captions = [q.caption for q in test_split.queries[:5]]
        emb, feats = embed_texts(model, tokenizer, captions, 48, "cpu", batch_size=2, progress=False)
        ranker = TwoStage(model, emb, feats, gallery["emb"], gallery["tokens"], k=6)
        order1 = ranker.stage1(0, 5).argsort(dim=1, descending=True)
        order2 = ranker.stage2(0, 5).argsort(dim=1, descending=True)
        for q, caption in enumerate(captions):
            assert order2[q, 6:].tolist() == order1[q, 6:].tolist()  # below K: stage-1 order
            assert sorted(order2[q, :6].tolist()) == sorted(order1[q, :6].tolist())
            tokens = data.tokenize(tokenizer, [caption] * 6, 48)
            pairs = model.encode_images(images[order2[q, :6]])  # re-scored from the images
            naive = model.pair_score(pairs["tokens"], model.text_features(**tokens))[0]
            assert (naive[1:] <= naive[:-1] + 1e-3).all(), naive  # stage 2 follows the fusion scores


def test_fusion_image_reliance_matches_a_naive_swap_and_is_nil_for_a_blind_fusion(tokenizer, test_split):
    from scipy.stats import spearmanr
    paths = [g.image_path for g in test_split.gallery]
    captions = [q.caption for q in test_split.queries[:6]]

    def reliance(model, k=5):
        with torch.no_grad():
            gallery = embed_gallery(model, paths, (64, 32), "cpu", progress=False)
            emb, feats = embed_texts(model, tokenizer, captions, 48, "cpu", progress=False)
            ranker = TwoStage(model, emb, feats, gallery["emb"], gallery["tokens"], k=k)
            return fusion_image_reliance(ranker, queries=5, batch=2), gallery, emb, feats

    torch.manual_seed(1)
    model = T2IReID(tiny_cfg()).eval()  # the paper's fusion, random weights: it reads the image
    got, gallery, emb, feats = reliance(model)
    own, swapped, rhos = [], [], []
    with torch.no_grad():
        for q in range(5):  # one query at a time, the next candidate's tokens by hand
            top = (emb[q] @ gallery["emb"].T).topk(5).indices
            text = feats[q:q + 1].expand(5, -1)
            tokens = gallery["tokens"][top].float()
            own.append(model.pair_score(tokens, text)[0])
            swapped.append(model.pair_score(tokens[[1, 2, 3, 4, 0]], text)[0])
            rhos.append(spearmanr(own[-1].numpy(), swapped[-1].numpy())[0])
    own, swapped = torch.stack(own), torch.stack(swapped)
    change = ((own - swapped).abs().mean() / own.std(1).mean()).item()
    assert got["k"] == 5 and got["queries"] == 5
    assert got["change"] == pytest.approx(change, rel=1e-3) and got["change"] > 0.05
    assert got["spearman"] == pytest.approx(sum(rhos) / 5, abs=1e-4) and got["spearman"] < 0.99
    # the softmax gate shut on the text: the image cannot reach the fusion's score
    with torch.no_grad():
        model.fusion.gate.weight.zero_(), model.fusion.gate.bias.copy_(torch.tensor([-40.0, 40.0]))
    blind = reliance(model)[0]
    assert blind["change"] < 1e-4 and blind["spearman"] == pytest.approx(1.0)
    assert reliance(model, k=2)[0] is None


def test_evaluate_model_two_stages_robustness_and_gates(tiny_model, tokenizer, test_split):
    args = (tiny_model, test_split, tokenizer, (64, 32), 48, "cpu")
    out = evaluate_model(*args, batch_size=16, rerank_k=5, progress=False)
    json.dumps(out)  # everything fits in metrics.json
    assert out["rerank_k"] == 5 and out["num_gallery"] == len(test_split.gallery) == 32
    tables = [out["stage1"], out["stage2"]] + [r[s] for key in ("table_v_as_shipped", "table_v_whole_text")
                                               for r in out[key].values() for s in ("stage1", "stage2")]
    tables += [t["cross_outfit"] for t in tables]
    assert list(out["table_v_as_shipped"]) == list(out["table_v_whole_text"]) == ["Standard", "Identity-Only",
                                                                                   "Clothes-Conflict"]
    for m in tables:
        assert all(0.0 <= m[c] <= 100.0 for c in ("R1", "R5", "R10", "mAP", "mINP"))
        assert m["mINP"] <= m["mAP"] + 1e-6 and m["R1"] <= m["R5"] <= m["R10"]
    # re-ranking the top 5 keeps the top-5 and top-10 sets, so R5 and R10 cannot change
    for key in ("R5", "R10"):
        assert out["stage2"][key] == pytest.approx(out["stage1"][key])
    assert out["gates"]["bdam"]["count"] == 32 and 0 < out["gates"]["bdam"]["mean"] < 1
    assert out["gates"]["fusion"]["count"] == 5 * len(test_split.queries)  # original captions only
    assert sum(out["gates"]["fusion"]["hist"]) == out["gates"]["fusion"]["count"]
    reliance = out["fusion_image_reliance"]  # its arithmetic: the naive swap test above
    assert reliance["k"] == 5 and reliance["queries"] == len(test_split.queries) and reliance["change"] > 0
    assert "fusion vs image" in report(out)
    ex = out["examples"]
    assert len(ex["queries"]) == 6 and all(len(p) == 10 for p in ex["paths"])
    pid_of = {g.image_path: g.pid for g in test_split.gallery}
    query_pid = {q.caption: q.pid for q in test_split.queries}
    assert ex["correct"][0] == [pid_of[p] == query_pid[ex["queries"][0]] for p in ex["paths"][0]]
    one = evaluate_model(*args, rerank_k=1, robustness=False, progress=False)
    flat = lambda m: {**{k: v for k, v in m.items() if k != "cross_outfit"},  # noqa: E731
                      **{f"cross {k}": v for k, v in m["cross_outfit"].items()}}
    assert flat(one["stage2"]) == pytest.approx(flat(one["stage1"])) and one["table_v_as_shipped"] is None  # K = 1: no change
    assert flat(one["stage1"]) == pytest.approx(flat(out["stage1"]))
    # every query's person has a second outfit in the tiny test split: all are ranked across outfits
    assert out["stage1"]["cross_outfit"]["queries"] == len(test_split.queries)
    assert out["clothing_weight"] == 0.0 and "other outfits" in report(out)
    quick = evaluate_model(*args, rerank_k=0, progress=False, limit_queries=7)
    assert quick["stage2"] is None and quick["num_queries"] == 7 and quick["gates"]["fusion"] is None
    assert quick["fusion_image_reliance"] is None and one["fusion_image_reliance"] is None
    assert all(r["stage2"] is None for r in quick["table_v_as_shipped"].values())
    bare = dataclasses.replace(test_split, gallery=[dataclasses.replace(g, identity=None) for g in test_split.gallery])
    skipped = evaluate_model(tiny_model, bare, *args[2:], rerank_k=0, progress=False)
    assert skipped["table_v_as_shipped"] is skipped["table_v_whole_text"] is None
    assert len(skipped["notes"]) == 1 and "describe.py" in skipped["notes"][0]
    assert "32 of 32 test images have no generated descriptions" in skipped["notes"][0]
    some = dataclasses.replace(test_split, gallery=[g if i % 4 else dataclasses.replace(g, clothing=None)
                                                    for i, g in enumerate(test_split.gallery)])
    partial = evaluate_model(tiny_model, some, *args[2:], rerank_k=0, progress=False)
    assert list(partial["table_v_whole_text"]) == ["Standard", "Identity-Only", "Clothes-Conflict"]
    assert partial["notes"] == ["robustness settings computed on the 24 of 32 test images that have "
                                "generated descriptions; 8 left out (rerun describe.py to describe them)"]
    assert "8 left out" in report(partial)


def test_ranked_list_picture_frames_and_size(tmp_path, tiny_synth, test_split):
    paths = [g.image_path for g in test_split.gallery[:10]]
    correct = [[i % 2 == 0 for i in range(10)], [False] * 10]
    out = ranked_list_picture(["a tall man with short grey hair " * 8, "a woman"], [paths, paths], correct,
                              tmp_path / "ranked.png")
    image = Image.open(out).convert("RGB")
    h, w = THUMB
    cell_w, cell_h = w + 2 * FRAME + GAP, h + 2 * FRAME + GAP
    assert image.size == (TEXT_WIDTH + 10 * cell_w, 2 * cell_h)
    y = GAP // 2 + 1  # inside the top edge of the first row's frames
    assert image.getpixel((TEXT_WIDTH + 1, y)) == FRAME_COLOURS[True]
    assert image.getpixel((TEXT_WIDTH + cell_w + 1, y)) == FRAME_COLOURS[False]
    unknown = Image.open(ranked_list_picture(["x"], [paths[:3]], None, tmp_path / "u.png")).convert("RGB")
    assert unknown.getpixel((TEXT_WIDTH + 1, y)) == FRAME_COLOURS[None]


def test_gate_summary_channel_spread_by_hand():
    """Two channels that move in opposite directions from image to image: the per-image mean over
    channels never moves (std 0), each channel does (std over the 3 images: 0.1)."""
    g = torch.tensor([[0.4, 0.6], [0.5, 0.5], [0.6, 0.4]])  # (images, channels)
    out = gate_summary([g.mean(1)], g)
    assert out["mean"] == pytest.approx(0.5) and out["std"] == pytest.approx(0.0, abs=1e-7)
    assert out["channel_std"] == pytest.approx(0.1, abs=1e-6) and out["count"] == 3
    assert "channel_std" not in gate_summary([g.mean(1)])


def test_gate_histograms_size(tmp_path):
    gates = {"bdam": {"mean": 0.6, "std": 0.1, "count": 3, "hist": [0] * 20 + [3] + [0] * 19}, "fusion": None}
    image = Image.open(gate_histograms(gates, tmp_path / "gates.png", size=(6.0, 2.0), dpi=50))
    assert image.size == (300, 100)


def test_gate_curves_size_and_skip(tmp_path):
    rows = [{"step": 1, "total": 3.0, "w_img": 0.3, "g_std": 0.1, "w_info": 1.0, "w_decouple": 1.0, "G_info": 2.0},
            {"step": 2, "total": 2.0, "w_img": 0.1, "w_info": 0.7, "w_decouple": 1.3},
            {"step": 2, "epoch": 1, "val_R1": 5.0}]  # a validation row, and a row without g_std
    curves = training_curves(rows)
    assert curves["w_img"] == {"W_img": ([1, 2], [0.3, 0.1])} and curves["g_std"] == {"g std": ([1], [0.1])}
    assert curves["weights"] == {"decouple": ([1, 2], [1.0, 1.3]), "info": ([1, 2], [1.0, 0.7])}  # not w_img
    image = Image.open(gate_curves(rows, tmp_path / "curves.png", size=(6.0, 2.0), dpi=50))
    assert image.size == (300, 100)
    assert gate_curves([{"step": 1, "w_info": 1.0}], tmp_path / "weights.png")  # GradNorm alone is drawn too
    assert gate_curves([{"step": 1, "total": 3.0}], tmp_path / "old.png") is None  # logged before the gates
    assert not (tmp_path / "old.png").exists()


def test_running_mean_by_hand():
    assert running_mean([1.0, 2.0, 3.0, 4.0], 2) == [1.0, 1.5, 2.5, 3.5]
    assert running_mean([1.0, 2.0, 6.0], 3) == [1.0, 1.5, 3.0] and running_mean([5.0], 1) == [5.0]


def test_training_figure_draws_the_logged_losses_weights_and_validation(tmp_path):
    """A fabricated log.jsonl of 100 steps (two tasks; validation after steps 50 and 100): one
    smoothed line per task's loss, one per task weight (and the 0.2 and 5 bounds), one point per
    validation; the figure is written as a PNG; a log with no training step draws nothing."""
    rows = [{"step": i, "epoch": (i - 1) // 50, "info": 4.0 - i / 50, "triplet": 0.3 + (i % 2) / 10, "total": 5.0,
             "w_info": 1.0 + i / 200, "w_triplet": 1.0 - i / 200, "G_info": 1.0} for i in range(1, 101)]
    rows.insert(50, {"step": 50, "epoch": 1, "val_R1": 12.5})
    rows.append({"step": 100, "epoch": 2, "val_R1": 20.0})
    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps(row) + "\n" for row in rows))
    fig = training_figure(read_log(log))
    losses, weights, val = fig.axes
    assert [line.get_label() for line in losses.get_lines()] == ["info", "triplet"]  # not "total"
    triplet = losses.get_lines()[1]
    assert list(triplet.get_xdata()) == list(range(1, 101))
    assert triplet.get_ydata()[1:] == pytest.approx([0.35] * 99)  # the running mean of 2 steps smooths it out
    assert "running mean of 2 steps" in losses.get_title() and losses.get_yscale() == "log"
    assert [line.get_label() for line in weights.get_lines()][:2] == ["info", "triplet"]
    assert len(weights.get_lines()) == 4 and weights.get_lines()[1].get_ydata()[-1] == pytest.approx(0.5)
    (points,) = val.get_lines()
    assert list(points.get_xdata()) == [50, 100] and list(points.get_ydata()) == [12.5, 20.0]
    assert val.get_title() == "validation Rank-1 (best 20.0 at step 100)"
    steps = [row for row in rows if "val_R1" not in row]
    for log_rows, why in ((steps, "no validation yet"), (steps + [{"step": 100, "val_R1": None}], "no validation split")):
        panel = training_figure(log_rows).axes[2]
        assert not panel.get_lines() and why in panel.texts[0].get_text()
    assert Image.open(training_picture(read_log(log), tmp_path / "curves.png")).size == (1350, 340)
    assert training_picture([{"step": 50, "epoch": 1, "val_R1": 1.0}], tmp_path / "none.png") is None
    assert read_log(tmp_path / "missing.jsonl") == [] and not (tmp_path / "none.png").exists()


def test_load_run_errors_and_round_trip(tmp_path, tiny_model, capsys):
    with pytest.raises(RunError, match="python train.py"):
        load_run(runs_dir=tmp_path / "runs")
    folder = tmp_path / "runs" / "r1"
    folder.mkdir(parents=True)
    # as train.py wrote it while an "objective" section held the losses', the fusion's two
    # training fields and the retrieval settings (K 5; beta and a left to the validation split)
    fusion = ("fusion_candidates", "fusion_detach")
    model = {k: v for k, v in dataclasses.asdict(tiny_model.cfg).items() if k not in (*fusion, "clothing_stream")}
    objective = {**dataclasses.asdict(LossConfig()), **{k: getattr(tiny_model.cfg, k) for k in fusion},
                 **dataclasses.asdict(RetrievalConfig(rerank_k=5))}
    (folder / "config.json").write_text(json.dumps({"train": {"data": "synth"}, "model": model,
                                                    "objective": objective}))
    with pytest.raises(RunError, match="no best.pt or last.pt"):
        load_run(folder)
    torch.save({"model": tiny_model.state_dict(), "step": 3}, folder / "last.pt")
    run = load_run(runs_dir=tmp_path / "runs")
    assert run.checkpoint.name == "last.pt" and run.train == {"data": "synth"}
    # the config's K; beta and a with no results.json beside the checkpoint: 0 and 1
    assert run.model_cfg == tiny_model.cfg and run.settings == RetrievalConfig(0.0, 5, 1.0)
    for (name, a), b in zip(tiny_model.state_dict().items(), run.model.state_dict().values()):
        assert torch.equal(a, b), name
    # the settings train.py's final evaluation chose on validation fill those the config left open
    (folder / "results.json").write_text(json.dumps({"clothing_weight": 0.3, "rerank_k": 20, "fusion_weight": 0.25}))
    assert load_run(folder).settings == RetrievalConfig(0.3, 5, 0.25)
    # config.json as train.py writes it now: one section per owner
    (folder / "config.json").write_text(json.dumps({"train": {"data": "synth"},
                                                    "model": dataclasses.asdict(tiny_model.cfg),
                                                    "loss": dataclasses.asdict(LossConfig()),
                                                    "retrieval": dataclasses.asdict(RetrievalConfig())}))
    run = load_run(folder)
    assert run.model_cfg == tiny_model.cfg and run.settings == RetrievalConfig(0.3, 20, 0.25)
    (folder / "results.json").unlink()
    assert load_run(folder).settings == RetrievalConfig(0.0, DEFAULT_RERANK, 1.0)
    assert main(["--run", str(tmp_path / "nowhere")]) == 2
    assert "python train.py" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["--run", str(folder), "--query", "a man", "--gallery", str(tmp_path / "empty")]) == 2
    assert "no .png or .jpg" in capsys.readouterr().err


def test_cli_evaluates_a_run_and_searches_a_folder(tmp_path, tiny_model, tiny_synth, capsys):
    folder = tmp_path / "run"
    folder.mkdir()
    train = {"data": "synth", "root": str(tiny_synth), "eval_batch": 16, "seed": 0}  # as train.TrainConfig
    (folder / "config.json").write_text(json.dumps({"train": train, "model": dataclasses.asdict(tiny_model.cfg),
                                                    "loss": dataclasses.asdict(LossConfig()),
                                                    "retrieval": dataclasses.asdict(RetrievalConfig(rerank_k=5))}))
    torch.save({"model": tiny_model.state_dict()}, folder / "best.pt")
    # train.py's choices on the validation split, beside best.pt
    (folder / "results.json").write_text(json.dumps({"clothing_weight": 0.25, "rerank_k": 20, "fusion_weight": 0.5}))
    (folder / "log.jsonl").write_text("".join(json.dumps({"step": i, "w_img": 0.5 - i / 10, "g_std": 0.1}) + "\n"
                                              for i in range(1, 4)))
    assert main(["--run", str(folder), "--device", "cpu", "--rerank-k", "3", "--limit-queries", "8"]) == 0
    printed = capsys.readouterr().out
    assert "stage 2 (fusion, top 3, a 0.5)" in printed and "describe.py" in printed  # no descriptions.jsonl
    assert "clothing weight 0.25" in printed and "stage 1 (dual encoder), other outfits" in printed
    assert f"data: synth under {Path(tiny_synth).resolve()} (from {folder / 'config.json'})" in printed
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["num_queries"] == 8 and metrics["rerank_k"] == 3
    assert Image.open(folder / "ranked_list.png").size[1] == 6 * (THUMB[0] + 2 * FRAME + GAP)
    assert Image.open(folder / "gates.png").size == (900, 320)
    assert Image.open(folder / "gates_over_training.png").size == (1350, 320)
    assert not (folder / "training_curves.png").exists()  # the log holds no loss to draw
    images = data.read_annotations("synth", tiny_synth).image_dir
    assert main(["--run", str(folder), "--query", "a tall man with short grey hair", "--gallery", str(images)]) == 0
    ranked = [line.split()[-1] for line in capsys.readouterr().out.splitlines() if line.strip()[:1].isdigit()]
    assert len(ranked) == 10 and all(Path(p).is_file() for p in ranked)
    assert Image.open(folder / "search.png").size[1] == THUMB[0] + 2 * FRAME + GAP
    assert main(["--run", str(folder), "--query", "a red jacket and jeans", "--gallery", str(images)]) == 0
    notices = [line for line in capsys.readouterr().out.splitlines() if line.startswith("notice:")]
    assert notices == ["notice: the query names no identity trait; it is ranked by its clothing alone"]
    with pytest.raises(SystemExit):
        main(["--run", str(folder), "--query", " ?! ", "--gallery", str(images)])
    assert "has no words" in capsys.readouterr().err
