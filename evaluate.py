"""Evaluation: retrieval metrics, two-stage retrieval, robustness settings (paper Sec. IV).

Read top to bottom, with the decisions of docs/design.md#1-honest-retrieval-retrieve-then-re-rank,
docs/design.md#5-text-side-only-identity-text-meets-the-identity-path and
docs/design.md#6-robustness-table-v:
* metrics: the community protocol (IRRA): every test caption a query, every test image in the
  gallery, Rank-1/5/10, mAP and mINP; where outfits are known, also the cloth-changing protocol
  (the query's own outfit leaves the gallery);
* Table V's settings, built from the test images' generated descriptions;
* the whole evaluation: stage 1 (dual encoder) and stage 2 (the fusion re-ranks each query's top
  K; helpers/retrieval.py), Fig. 5's gates, whether the fusion reads the image;
* the retrieval settings (beta, K, a), chosen on the validation split, written to results.json;
* runs written by train.py, and the command line (pictures: helpers/pictures.py).

    python evaluate.py                          # newest run: tables, metrics.json and pictures
    python evaluate.py --run runs/NAME --limit-queries 200 --rerank-k 10
    python evaluate.py --checkpoint runs/NAME/best.pt   # a checkpoint wherever it lies
    python evaluate.py --data synth --root data-real   # the run's model on other data (default: the run's)
    python evaluate.py --query "a tall man with short grey hair" --gallery DIR   # writes search.png
    pytest tests/test_evaluate.py
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import random
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from data import DATASETS, DatasetError, load_dataset
from helpers import lexicon
from helpers.encoders import EncoderLoadError, load_tokenizer
from helpers.metrics import metrics_of_both_stages
from helpers.pictures import gate_curves, gate_histograms, ranked_list_picture, read_log, training_picture
from helpers.reports import example_rankings, gate_summary, report, rerank_report, sweep_report
from helpers.retrieval import embed_gallery, fusion_image_reliance, query_ranker
from helpers.runs import RunError, find_checkpoint, read_saved
from helpers.sweeps import clothing_weight_sweep, rerank_sweep
from model import ModelConfig, T2IReID


# ----------------------------------------------------------------------------------------------
# Robustness settings (Table V, docs/design.md#6-robustness-table-v)

def derangement(pids: list, seed: int) -> list[int]:
    """A seeded permutation with no fixed point: partner[i] != i, and partner[i] has another
    identity than i whenever no identity holds more than half of the images.

    The images are laid end to end in identity groups (groups in a random order, each shuffled)
    and each one's partner is the image m places further on, cyclically, m = the largest group.
    """
    n = len(pids)
    if n < 2:
        raise ValueError(f"a derangement needs at least 2 images, got {n}")
    rng = random.Random(seed)
    groups = {}
    for i, pid in enumerate(pids):
        groups.setdefault(pid, []).append(i)
    groups = list(groups.values())
    rng.shuffle(groups)
    for group in groups:
        rng.shuffle(group)
    order = [i for group in groups for i in group]
    largest = max(len(group) for group in groups)
    shift = largest if largest < n else 1  # one identity only: any other image
    partner = [0] * n
    for position, i in enumerate(order):
        partner[i] = order[(position + shift) % n]
    return partner


def robustness_queries(gallery: list, seed: int = 0) -> tuple[dict, list, list] | None:
    """One query per described gallery image for each setting, with the pid and the outfit of
    the image each query describes (Clothes-Conflict: the image whose identity it names).

    Images without a generated identity or clothing description are left out of the queries
    (they stay in the gallery); the caller reports how many. None when fewer than two images are
    described (a derangement needs two)."""
    described = [g for g in gallery if g.identity and g.clothing]
    if len(described) < 2:
        return None
    partner = derangement([g.pid for g in described], seed)
    settings = {"Standard": [f"{g.identity} {g.clothing}" for g in described],
                "Identity-Only": [g.identity for g in described],
                "Clothes-Conflict": [f"{g.identity} {described[j].clothing}"
                                     for g, j in zip(described, partner)]}
    return settings, [g.pid for g in described], [g.outfit for g in described]


# ----------------------------------------------------------------------------------------------
# The whole evaluation

def robustness_metrics(ranker, gallery: list, limit_queries, seed: int, notes: list,
                       batch_size=64, progress=True) -> dict | None:
    """Table V on the test images that have generated descriptions; the images left out (and
    why) are appended to `notes`. None, with a note, when fewer than two are described."""
    built = robustness_queries(gallery, seed)
    missing = sum(1 for g in gallery if not (g.identity and g.clothing))
    if built is None:
        notes.append(f"robustness settings skipped: {missing} of {len(gallery)} test images have no generated "
                     "descriptions (run describe.py to write descriptions.jsonl)")
        return None
    settings, pids, outfits = built
    if missing:
        notes.append(f"robustness settings computed on the {len(pids)} of {len(gallery)} test images that have "
                     f"generated descriptions; {missing} left out (rerun describe.py to describe them)")
    gallery_pids, gallery_outfits = [g.pid for g in gallery], [g.outfit for g in gallery]
    return {name: dict(zip(("stage1", "stage2"), metrics_of_both_stages(
                ranker(texts[:limit_queries]), pids[:limit_queries], gallery_pids, batch_size, progress,
                outfits=outfits[:limit_queries], gallery_outfits=gallery_outfits)))
            for name, texts in settings.items()}


@torch.no_grad()
def evaluate_model(model: T2IReID, data, tokenizer, image_size, max_len: int, device, batch_size=64,
                   rerank_k=None, robustness=True, progress=True, seed=0, limit_queries=None,
                   clothing_weight: float = 0.0, fusion_weight: float | None = None) -> dict:
    """Stage 1 and stage 2 on the original captions of `data` (a data.ReIDData), Table V in both
    protocols, each also across outfits where the dataset knows them, the gate statistics, and
    example ranked lists; every value fits in JSON.

    rerank_k: K for stage 2 (default DEFAULT_RERANK); 0, or a model without fusion: stage 1 only.
    fusion_weight: a of TwoStage (default 1).  clothing_weight: beta of TwoStage.
    limit_queries: rank only the first N queries of each set (a quick check).
    Table V's protocols: "table_v_as_shipped" (the query split, this beta) and
    "table_v_whole_text" (each setting's string whole on the identity path, beta 0).
    The model must be on `device`; its train/eval mode is restored on return.
    """
    was_training = model.training
    k = (DEFAULT_RERANK if rerank_k is None else rerank_k) if model.fusion is not None else 0
    a = 1.0 if fusion_weight is None else fusion_weight
    model.eval()
    gallery = embed_gallery(model, [g.image_path for g in data.gallery], image_size, device, batch_size, progress)
    gallery_pids, gallery_outfits = [g.pid for g in data.gallery], [g.outfit for g in data.gallery]
    ranker = query_ranker(model, gallery, tokenizer, max_len, device, k, clothing_weight, batch_size, progress, a)
    queries = data.queries[:limit_queries]
    texts, pids, fusion_gate = [q.caption for q in queries], [q.pid for q in queries], []
    captions = ranker(texts)
    stage1, stage2 = metrics_of_both_stages(captions, pids, gallery_pids, batch_size, progress, fusion_gate,
                                            [q.outfit for q in queries], gallery_outfits)
    bdam_gate = [gallery["gate"].mean(1)] if gallery["gate"] is not None else []  # (G,) per image
    result = dict(dataset=data.name, num_queries=len(texts), num_gallery=len(gallery_pids), rerank_k=k,
                  fusion_weight=a, clothing_weight=clothing_weight, stage1=stage1, stage2=stage2,
                  table_v_as_shipped=None, table_v_whole_text=None, notes=[],
                  gates=dict(bdam=gate_summary(bdam_gate, gallery["gate"]), fusion=gate_summary(fusion_gate)),
                  examples=example_rankings(captions.stage2 if k else captions.stage1, texts, pids, data.gallery, 6, seed))
    only = int(captions.clothing_only.sum()) if captions.clothing_only is not None else 0
    if only:
        result["notes"].append(f"{only} of {len(texts)} caption queries name no identity trait: they rank by "
                               "their clothing alone, and stage 2 keeps their stage-1 order")
    result["fusion_image_reliance"] = fusion_image_reliance(captions) if k else None
    if robustness:
        whole = query_ranker(model, gallery, tokenizer, max_len, device, k, 0.0, batch_size, progress, a, split=False)
        for key, rank, notes in (("table_v_as_shipped", ranker, result["notes"]), ("table_v_whole_text", whole, [])):
            result[key] = robustness_metrics(rank, data.gallery, limit_queries, seed, notes, batch_size, progress)
    model.train(was_training)
    return result


# ----------------------------------------------------------------------------------------------
# The retrieval settings: beta, then stage 2's K and a, chosen on the validation split

DEFAULT_RERANK = 10  # K where none was chosen
CLOTHING_WEIGHTS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0)  # the betas choose_from_sweep tries
RERANK_KS, FUSION_WEIGHTS = (5, 10, 20), (0.0, 0.25, 0.5, 0.75, 1.0)  # what choose_k_and_a tries


@dataclass
class RetrievalConfig:
    """Retrieval's fields: how a query scores an image. < 0: chosen on the validation split after
    training (choose_settings), never on the test split."""

    clothing_weight: float = -1.0  # beta of docs/design.md#5-text-side-only-identity-text-meets-the-identity-path
    rerank_k: int = -1  # K of docs/design.md#1-honest-retrieval-retrieve-then-re-rank
    fusion_weight: float = -1.0  # a: stage 2 scores a candidate (1 - a) s1 + a s_fus

    def __post_init__(self):
        if self.rerank_k == 0 or self.fusion_weight > 1:
            raise ValueError("RetrievalConfig: rerank_k must be >= 1 (or < 0: chosen), fusion_weight <= 1 "
                             "(or < 0: chosen)")


def selection_key(rows: list[dict]) -> str:
    """The validation measure a setting is chosen by: mAP over the person's other outfits where
    the data knows outfits (what decoupling is for), else mAP (same-clothes data, CUHK-PEDES)."""
    return "cross_mAP" if all(row.get("cross_mAP") is not None for row in rows) else "mAP"


def choose_from_sweep(rows: list[dict]) -> float:
    """The beta with the best validation accuracy (selection_key), the smallest on a tie; Table V
    does not constrain it (docs/design.md#6-robustness-table-v)."""
    key = selection_key(rows)
    return max(rows, key=lambda row: (row[key], -row["clothing_weight"]))["clothing_weight"]


def choose_k_and_a(rows: list[dict]) -> tuple[int, float]:
    """(K, a): the best validation Rank-1 among the settings whose selection_key measure is no
    lower than stage 1's (a = 0); ties to the smaller a, then the smaller K."""
    key = selection_key(rows)
    floor = max((row[key] for row in rows if row["fusion_weight"] == 0), default=float("-inf"))
    fair = [row for row in rows if row[key] >= floor - 1e-9]
    best = max(fair, key=lambda row: (row["R1"], -row["fusion_weight"], -row["rerank_k"]))
    return best["rerank_k"], best["fusion_weight"]


def choose_settings(model: T2IReID, val, tokenizer, settings: RetrievalConfig, device, batch_size=64,
                    seed=0) -> tuple[RetrievalConfig, dict]:
    """beta, then K and a: the config's where >= 0, else chosen on `val` (None without a
    validation split: beta 0, K 10, a 1). Returns them and the sweeps' rows for results.json."""
    beta, k, a = settings.clothing_weight, settings.rerank_k, settings.fusion_weight
    sweeps = dict(clothing_weight_sweep=None, rerank_sweep=None)
    if val is not None and (beta < 0 or (model.fusion is not None and min(k, a) < 0)):
        was_training = model.training
        model.eval()
        gallery = embed_gallery(model, [g.image_path for g in val.gallery], model.cfg.image_size, device,
                                batch_size, False)
        if beta < 0:
            rows = sweeps["clothing_weight_sweep"] = clothing_weight_sweep(
                model, val, gallery, tokenizer, device, batch_size, CLOTHING_WEIGHTS, robustness_queries(val.gallery, seed))
            beta = choose_from_sweep(rows)
            print(sweep_report(rows, beta))
        if model.fusion is not None and min(k, a) < 0:
            rows = sweeps["rerank_sweep"] = rerank_sweep(model, val, gallery, tokenizer, device, beta, batch_size,
                                                         (k,) if k > 0 else RERANK_KS, (a,) if a >= 0 else FUSION_WEIGHTS)
            k, a = choose_k_and_a(rows)
            print(rerank_report(rows, (k, a)))
        model.train(was_training)
    return RetrievalConfig(max(beta, 0.0), k if k > 0 else DEFAULT_RERANK, a if a >= 0 else 1.0), sweeps


def evaluate_and_save(model: T2IReID, dataset, val, tokenizer, settings: RetrievalConfig, device, folder: Path,
                      batch_size=64, seed=0) -> dict:
    """A trained model's test evaluation (train.py's last step): the settings left open chosen on
    `val`, then both stages and Table V on the test split -> folder/results.json, whose settings
    `python evaluate.py --run` uses."""
    chosen, sweeps = choose_settings(model, val, tokenizer, settings, device, batch_size, seed)
    results = evaluate_model(model, dataset, tokenizer, model.cfg.image_size, model.cfg.max_text_len, device,
                             batch_size, chosen.rerank_k, seed=seed, clothing_weight=chosen.clothing_weight,
                             fusion_weight=chosen.fusion_weight)
    results.update(sweeps)
    (folder / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    print(report(results))
    print(f"wrote {folder / 'results.json'}; pictures: python evaluate.py --run {folder}")
    return results


# ----------------------------------------------------------------------------------------------
# Runs written by train.py

@dataclass
class Run:
    folder: Path  # the checkpoint's folder: metrics.json and the pictures go there
    train: dict  # the configuration's "train" section
    model_cfg: ModelConfig
    model: T2IReID  # weights from best.pt, else last.pt, on the CPU
    checkpoint: Path
    settings: RetrievalConfig  # the config's, else those results.json says were chosen, else beta 0, K 10, a 1
    config_file: Path | None = None  # where the configuration came from: the checkpoint, or config.json


def config_of(cls, *sections: dict):
    """A config dataclass from the fields of `sections` that it owns, later sections winning."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for section in sections for k, v in section.items() if k in names})


def model_config(config: dict) -> ModelConfig:
    """A run's ModelConfig; a run written with an "objective" section had clothing projections only with L_aln."""
    old = config.get("objective", {})
    legacy = {"clothing_stream": old["loss_aln"]} if "loss_aln" in old and "clothing_stream" not in config["model"] else {}
    return config_of(ModelConfig, old, legacy, config["model"])


def load_run(run=None, runs_dir="runs") -> Run:
    """A run folder written by train.py (default: runs/latest, else the newest under runs/): its
    best.pt, else its last.pt."""
    return load_checkpoint(find_checkpoint(run, runs_dir))


def load_checkpoint(path) -> Run:
    """A best.pt or last.pt wherever it lies, with its configuration (read_saved) and the
    retrieval settings results.json beside it holds for those the configuration left open."""
    path = Path(path)
    saved, config, config_file = read_saved(path)
    try:  # runs written before the losses had their own config keep fusion fields in "objective"
        model_cfg = model_config(config)
        settings = config_of(RetrievalConfig, config.get("objective", {}), config.get("retrieval", {}))
    except (KeyError, TypeError, ValueError) as e:
        raise RunError(f"{config_file}: bad 'model' or 'retrieval' section ({e}); rerun train.py.") from None
    model = T2IReID(model_cfg)
    try:
        model.load_state_dict(saved["model"])
    except RuntimeError as e:
        raise RunError(f"{path} does not fit {config_file} ({str(e)[:200]})") from None
    results = path.parent / "results.json"
    chosen = json.loads(results.read_text()) if results.is_file() else {}
    for name, value in dataclasses.asdict(settings).items():
        if value < 0 and chosen.get(name) is not None:
            setattr(settings, name, chosen[name])
    settings = RetrievalConfig(max(settings.clothing_weight, 0.0), settings.rerank_k if settings.rerank_k > 0 else
                               DEFAULT_RERANK, settings.fusion_weight if settings.fusion_weight >= 0 else 1.0)
    return Run(path.parent, config.get("train", {}), model_cfg, model.eval(), path, settings, config_file)


# ----------------------------------------------------------------------------------------------
# Command line

def search(run: Run, query: str, folder, device, progress=True) -> Path:
    """Rank the .png/.jpg images under `folder` for `query`; writes search.png in the run folder."""
    folder = Path(folder)
    paths = sorted(str(p) for p in folder.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    if not paths:
        raise DatasetError(f"--gallery {folder}: {'no .png or .jpg images under it' if folder.is_dir() else 'no such folder'}")
    model, cfg = run.model.to(device).eval(), run.model_cfg
    tokenizer = load_tokenizer(cfg.text_model or None)
    identity, clothing, named = lexicon.split_query(query)
    print(f"query split (lexicon): identity {identity!r}; clothing {clothing or '(none named)'!r}")
    if not named:
        print("notice: the query names no identity trait; it is ranked by "
              + ("its clothing alone" if clothing and model.clothing_text_proj is not None
                 else "the whole query on the identity path"))
    with torch.no_grad():
        gallery = embed_gallery(model, paths, cfg.image_size, device, progress=progress)
        k = run.settings.rerank_k if gallery["tokens"] is not None else 0
        ranker = query_ranker(model, gallery, tokenizer, cfg.max_text_len, device, k, run.settings.clothing_weight,
                              progress=False, fusion_weight=run.settings.fusion_weight)([query])
        scores = (ranker.stage2 if k else ranker.stage1)(0, 1)[0]  # (G,)
    top = scores.topk(min(10, len(paths))).indices.tolist()
    for rank, g in enumerate(top, 1):
        print(f"{rank:3d}  {paths[g]}")
    return ranked_list_picture([query], [[paths[g] for g in top]], None, run.folder / "search.png")


def evaluate_run(run: Run, device, limit_queries=None, data=None, root=None) -> dict:
    """evaluate_model on the test split of the run's dataset (or of `data` under `root`, when
    given); prints where the data came from and the tables, writes metrics.json and pictures."""
    train, cfg = run.train, run.model_cfg
    name, folder = data or train.get("data", "synth"), root or train.get("root", "data")
    origin = "given on the command line" if data or root else f"from {run.config_file}"
    print(f"data: {name} under {Path(folder).resolve()} ({origin})")
    dataset = load_dataset(name, folder)
    result = evaluate_model(run.model.to(device), dataset, load_tokenizer(cfg.text_model or None), cfg.image_size,
                            cfg.max_text_len, device, train.get("eval_batch", 64), run.settings.rerank_k,
                            seed=train.get("seed", 0), limit_queries=limit_queries,
                            clothing_weight=run.settings.clothing_weight, fusion_weight=run.settings.fusion_weight)
    print(report(result))
    record = dict(run=str(run.folder), checkpoint=run.checkpoint.name, data_root=str(Path(folder).resolve()), **result)
    (run.folder / "metrics.json").write_text(json.dumps(record, indent=1))
    ex = result["examples"]
    pictures = [ranked_list_picture(ex["queries"], ex["paths"], ex["correct"], run.folder / "ranked_list.png"),
                gate_histograms(result["gates"], run.folder / "gates.png")]
    rows = read_log(run.folder / "log.jsonl")  # none beside a checkpoint copied alone
    pictures += [p for p in [gate_curves(rows, run.folder / "gates_over_training.png"),
                             training_picture(rows, run.folder / "training_curves.png")] if p]
    for path in [run.folder / "metrics.json", *pictures]:
        print(f"wrote {path}")
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", help="run folder (default: runs/latest, else the newest under runs/)")
    parser.add_argument("--checkpoint", help="a best.pt or last.pt wherever it lies, with the configuration it "
                                             "carries (else the config.json beside it); in place of --run")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                        help="where to run (default: auto, a CUDA GPU if there is one)")
    parser.add_argument("--data", choices=DATASETS, help="dataset (default: the run's, from its config.json)")
    parser.add_argument("--root", help="data root (default: the run's, from its config.json)")
    parser.add_argument("--rerank-k", type=int, help="K for stage 2 (default: the run's; 0: stage 1 only)")
    parser.add_argument("--fusion-weight", type=float, help="a, the fusion's share of a candidate's score (default: the run's)")
    parser.add_argument("--limit-queries", type=int, help="rank only the first N queries of each set (default: all)")
    parser.add_argument("--clothing-weight", type=float,
                        help="beta, the weight of a query's clothing part (default: the run's, chosen on the "
                             "validation split after training: results.json)")
    parser.add_argument("--query", help="a description to search --gallery with")
    parser.add_argument("--gallery", help="a folder of your own images (.png/.jpg, searched recursively)")
    args = parser.parse_args(argv)
    if (args.query is None) != (args.gallery is None):
        parser.error("--query and --gallery go together")
    if args.run and args.checkpoint:
        parser.error("--run and --checkpoint name the same thing: give one")
    if args.query is not None and not lexicon.WORD_RE.search(args.query):
        parser.error(f"--query {args.query!r} has no words: describe the person, "
                     "e.g. --query 'a tall man with short grey hair in a red jacket'")
    if args.clothing_weight is not None and args.clothing_weight < 0:
        parser.error("--clothing-weight must be >= 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: this machine has no CUDA GPU (or torch is a CPU build); use --device cpu")
    if args.rerank_k is not None and args.rerank_k < 0:
        parser.error("--rerank-k must be >= 0 (0: stage 1 only)")
    if args.fusion_weight is not None and not 0 <= args.fusion_weight <= 1:
        parser.error("--fusion-weight must be in [0, 1]")
    if args.limit_queries is not None and args.limit_queries < 1:
        parser.error("--limit-queries must be >= 1")
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    try:
        run = load_checkpoint(args.checkpoint) if args.checkpoint else load_run(args.run)
        for name in ("clothing_weight", "rerank_k", "fusion_weight"):  # the command line over the run's
            if getattr(args, name) is not None:
                setattr(run.settings, name, getattr(args, name))
        print(f"run {run.folder} ({run.checkpoint.name}), device {device}, {run.settings}")
        if args.query is not None:
            print(f"wrote {search(run, args.query, args.gallery, device)}")
            return 0
        evaluate_run(run, device, args.limit_queries, args.data, args.root)
    except (DatasetError, RunError, EncoderLoadError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
