"""Two-stage text-to-image retrieval: the gallery and the queries embedded, each query split
into identity and clothing, stage 1 (dual encoder) and stage 2 (fusion re-ranking).

Paper Sec. III-D with the protocol of docs/design.md#1-honest-retrieval-retrieve-then-re-rank
and the text side of docs/design.md#5-text-side-only-identity-text-meets-the-identity-path: the
gallery is embedded once from images alone (and its fusion tokens cached); each query is split
by the lexicon of the rules backend (`lexicon.split_query`) into an identity part, which meets
the visual identity (stage 1, and the fusion in stage 2), and a clothing part, which meets the
clothing stream with weight beta. `TwoStage` serves both stages as rows of score matrices, the
callable form of `evaluate.retrieval_metrics`; `fusion_image_reliance` asks whether stage 2
reads the image at all. evaluate.py measures all this; `python evaluate.py --query` uses it to
search a folder.

Tests: pytest tests/test_evaluate.py
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm import tqdm

from helpers import lexicon
from data import eval_transform, load_image, tokenize
from model import T2IReID


# ----------------------------------------------------------------------------------------------
# Embedding: the gallery from images alone, the queries from text alone (docs/design.md#1-honest-retrieval-retrieve-then-re-rank)

def _chunks(items: list, size: int, desc: str, progress: bool):
    starts = range(0, len(items), size)
    return (items[s:s + size] for s in tqdm(starts, desc=desc, disable=not progress, leave=False))


def embed_gallery(model: T2IReID, paths: list, image_size, device, batch_size=64, progress=True) -> dict:
    """Each gallery image goes through the ViT and BDAM once, for four things.

    Returns dict(emb (G, E) on `device`; tokens (G, P, d), or None without fusion; gate (G, D)
    the BDAM gate g of each image, or None; clo (G, E) the clothing embedding on `device`, or
    None without a clothing stream), all from model.encode_images.
    The token cache lives on the CPU in float16 -- G x P x d x 2 bytes: 0.3 GB for CUHK-PEDES at
    224 x 224 (3,074 x 196 x 256), 2.0 GB for ICFG-PEDES -- and stage 2 moves only each query's K
    candidates to the device. Recomputing tokens instead would cost K image passes per query.
    """
    transform = eval_transform(image_size)
    emb, tokens, gate, clo = [], [], [], []
    for chunk in _chunks(list(paths), batch_size, "gallery", progress):
        images = torch.stack([transform(load_image(p)) for p in chunk]).to(device)  # (b, 3, H, W)
        out = model.encode_images(images)
        emb.append(out["emb"])  # (b, E)
        if out["clo_emb"] is not None:
            clo.append(out["clo_emb"])  # (b, E)
        if out["tokens"] is not None:
            tokens.append(out["tokens"].to("cpu", torch.float16))  # (b, P, d)
        if out["gate"] is not None:
            gate.append(out["gate"].float().cpu())  # (b, D) identity share of each channel
    return dict(emb=torch.cat(emb), tokens=torch.cat(tokens) if tokens else None,
                gate=torch.cat(gate) if gate else None, clo=torch.cat(clo) if clo else None)


def embed_texts(model: T2IReID, tokenizer, texts: list, max_len: int, device, batch_size=64, progress=True,
                clothing=False):
    """Texts alone -> (Q, E) L2-normalised embeddings, (Q, Dt) text features: the identity
    embedding t(text) (as encode_texts), or with `clothing` the clothing embedding of L_aln."""
    emb, feats = [], []
    project = model.clothing_embedding if clothing else model.text_embedding
    for chunk in _chunks(list(texts), batch_size, "queries", progress):
        tokens = {k: v.to(device) for k, v in tokenize(tokenizer, chunk, max_len).items()}  # (b, T)
        f = model.text_features(**tokens)  # (b, Dt)
        feats.append(f)
        emb.append(project(f))  # (b, E)
    return torch.cat(emb), torch.cat(feats)


def embed_queries(model: T2IReID, tokenizer, texts: list, max_len: int, device, batch_size=64,
                  progress=True, split=True) -> dict:
    """Search queries, each split into its identity and clothing parts by the lexicon of the
    rules backend (lexicon.split_query, docs/design.md#5-text-side-only-identity-text-meets-the-identity-path): the identity part meets the visual identity
    (stage 1 and the fusion), the clothing part the clothing stream. A query that names no
    identity trait ranks by its clothing part alone (`clothing_only`); where the model has no
    clothing stream, or the query names no clothing either, by the whole query on the identity
    path. Returns dict(emb (Q, E), feats (Q, Dt): the identity side; clo (Q, E), zero rows for
    queries that name no clothing, or None without a clothing stream; clothing_only (Q,) bool).
    split=False: each query whole on the identity path, no clothing side (Table V's whole-text
    protocol: does the model itself ignore clothing words?)."""
    if not split:
        emb, feats = embed_texts(model, tokenizer, texts, max_len, device, batch_size, progress)
        return dict(emb=emb, feats=feats, clo=None, clothing_only=torch.zeros(len(texts), dtype=torch.bool,
                                                                             device=emb.device))
    parts = [lexicon.split_query(text) for text in texts]  # (identity, clothing, names_identity)
    stream = model.clothing_text_proj is not None
    only = [stream and not named and bool(clothing) for _, clothing, named in parts]
    identity = [part if named else text for (part, _, named), text in zip(parts, texts)]
    emb, feats = embed_texts(model, tokenizer, identity, max_len, device, batch_size, progress)
    clo = None
    if stream:
        clo = emb.new_zeros(emb.shape)  # (Q, E)
        named = [i for i, (_, clothing, _) in enumerate(parts) if clothing]
        if named:
            clo[named] = embed_texts(model, tokenizer, [parts[i][1] for i in named], max_len, device,
                                     batch_size, progress, clothing=True)[0]
    return dict(emb=emb, feats=feats, clo=clo, clothing_only=torch.tensor(only, device=emb.device))


# ----------------------------------------------------------------------------------------------
# The two stages, as rows of score matrices for retrieval_metrics' callable form

def rerank(stage1: torch.Tensor, candidates: torch.Tensor, fusion: torch.Tensor) -> torch.Tensor:
    """Stage 2's ranking as scores: each row's candidates go above every other image, in the order
    of their fusion scores; the other images keep their stage-1 scores, hence their order.

    stage1 (n, G), candidates (n, K) gallery indices, fusion (n, K) -> (n, G).
    """
    lift = stage1.amax(1, keepdim=True) - fusion.amin(1, keepdim=True) + 1.0  # (n, 1)
    return stage1.scatter(1, candidates, fusion + lift)  # lowest candidate > highest non-candidate


@dataclass
class TwoStage:
    """Queries (embeddings and text features) against a gallery (embeddings and cached tokens).

    A query's score of an image is its identity score (stage 1: cosine of the identity
    embeddings s1; stage 2, for the top K: (1 - a) s1 + a s_fus, s_fus the fusion's pair score)
    plus clothing_weight times the cosine of the
    query's clothing part with the image's clothing embedding (zero for a query that names no
    clothing). A query that names no identity trait (clothing_only) scores by its clothing alone,
    and stage 2 keeps its stage-1 order: it has no identity for the fusion to compare."""

    model: T2IReID
    query_emb: torch.Tensor  # (Q, E) identity side
    query_feats: torch.Tensor  # (Q, Dt) identity side
    gallery_emb: torch.Tensor  # (G, E)
    tokens: torch.Tensor | None  # (G, P, d), float16 on the CPU
    k: int  # K candidates re-ranked per query
    gates: list | None = None  # when a list, stage2 appends the mean W_img of each pair (Fig. 5)
    query_clo: torch.Tensor | None = None  # (Q, E) clothing side, zero rows where none is named
    gallery_clo: torch.Tensor | None = None  # (G, E)
    clothing_weight: float = 0.0  # beta
    clothing_only: torch.Tensor | None = None  # (Q,) bool
    fusion_weight: float = 1.0  # a: a candidate's stage-2 identity score is (1 - a) s1 + a s_fus

    def clothing(self, start: int, end: int) -> torch.Tensor | None:
        """Rows start:end of the clothing cosine (n, G), or None without a clothing side."""
        if self.query_clo is None or self.gallery_clo is None:
            return None
        return self.query_clo[start:end] @ self.gallery_clo.T

    def stage1(self, start: int, end: int) -> torch.Tensor:
        """Rows start:end of the stage-1 scores (cosines; both sides are L2-normalised): (n, G)."""
        scores = self.query_emb[start:end] @ self.gallery_emb.T
        clothing = self.clothing(start, end)
        if clothing is None:
            return scores
        only = self.clothing_only[start:end, None]  # (n, 1)
        return torch.where(only, clothing, scores + self.clothing_weight * clothing)

    def stage2(self, start: int, end: int) -> torch.Tensor:
        """Rows start:end with each query's top K re-scored by the fusion module: (n, G)."""
        return rerank(*self.fusion_scores(start, end))

    def fusion_scores(self, start: int, end: int, swap: torch.Tensor | None = None):
        """Rows start:end -> stage-1 scores (n, G), each query's top K candidates (n, K) and their
        stage-2 scores (n, K): (1 - a) s1 + a s_fus on the identity side, plus the clothing term
        as in stage 1 (a = fusion_weight). swap, a permutation of the K: candidate j is scored
        with the image tokens of candidate swap[j], for fusion_image_reliance."""
        scores = self.stage1(start, end)  # (n, G)
        k = min(self.k, scores.shape[1])
        candidates = scores.topk(k, dim=1).indices  # (n, K)
        seen = candidates if swap is None else candidates[:, swap]  # whose tokens each candidate gets
        tokens = self.tokens[seen.flatten().cpu()].to(scores.device, torch.float32)  # (n K, P, d)
        texts = self.query_feats[start:end].repeat_interleave(k, dim=0)  # (n K, Dt)
        queries = self.query_emb[start:end].repeat_interleave(k, dim=0)  # (n K, E)
        fusion, w_image = self.model.pair_score(tokens, texts, queries)  # (n K,), (n K,)
        if self.gates is not None:
            self.gates.append(w_image.float().cpu())  # (n K,)
        fusion = fusion.view(-1, k).float()  # (n, K)
        identity = (self.query_emb[start:end, None, :] * self.gallery_emb[candidates]).sum(-1)  # (n, K) s1
        combined = scores.gather(1, candidates) + self.fusion_weight * (fusion - identity)  # (n, K)
        if self.clothing_only is not None:  # no identity to fuse: the stage-1 order
            combined = torch.where(self.clothing_only[start:end, None], scores.gather(1, candidates), combined)
        return scores, candidates, combined


def fusion_image_reliance(ranker: TwoStage, queries: int = 200, batch: int = 50) -> dict | None:
    """Does the fusion look at the image? For the first `queries` queries, each top-K candidate is
    scored again with the image tokens of the next candidate in its list (a cyclic swap; the
    stage-1 embeddings stay in place). `change`: the mean absolute change of a fusion score over
    the mean spread (std) of the fusion scores within a list; `spearman`: the mean rank correlation
    of each list's two orders. A fusion that ignores the image gives change 0 and spearman 1 --
    whatever its W_img, whose softmax can favour the text and still pass on the image, or the
    reverse. None when K < 3 (too few candidates to correlate)."""
    n, k = min(queries, len(ranker.query_emb)), min(ranker.k, len(ranker.gallery_emb))
    if k < 3:
        return None
    swap = torch.roll(torch.arange(k), -1)  # candidate j reads the tokens of candidate j + 1
    blocks = [(start, min(start + batch, n)) for start in range(0, n, batch)]
    own = torch.cat([ranker.fusion_scores(start, end)[2] for start, end in blocks])  # (n, K)
    swapped = torch.cat([ranker.fusion_scores(start, end, swap)[2] for start, end in blocks])  # (n, K)
    spread = own.std(1).mean().clamp_min(1e-12)
    ranks = [x.argsort(1).argsort(1).float() for x in (own, swapped)]
    ranks = [r - r.mean(1, keepdim=True) for r in ranks]
    spearman = (ranks[0] * ranks[1]).sum(1) / (ranks[0].norm(dim=1) * ranks[1].norm(dim=1))
    return dict(change=((own - swapped).abs().mean() / spread).item(), spearman=spearman.mean().item(),
                queries=n, k=k)


def query_ranker(model: T2IReID, gallery: dict, tokenizer, max_len: int, device, k: int, clothing_weight: float,
                 batch_size=64, progress=True, fusion_weight: float = 1.0, split: bool = True):
    """texts -> a TwoStage of those queries (split by embed_queries unless split=False) against an
    embedded gallery."""
    def ranker(texts: list) -> TwoStage:
        q = embed_queries(model, tokenizer, texts, max_len, device, batch_size, progress, split)
        return TwoStage(model, q["emb"], q["feats"], gallery["emb"], gallery["tokens"], k, query_clo=q["clo"],
                        gallery_clo=gallery["clo"], clothing_weight=clothing_weight if split else 0.0,
                        clothing_only=q["clothing_only"], fusion_weight=fusion_weight)
    return ranker
