"""Style-guided identity and clothing descriptions from a multimodal LLM (paper Sec. III-B).

For every image of a dataset this script writes two texts: an *identity* description (gender
presentation, age, height, build, skin, hair, glasses) and a *clothing* description (garments,
colours, patterns, shoes, bags, accessories, sunglasses among them). Glasses are identity: a
person keeps them from outfit to outfit (docs/design.md#11-glasses-are-identity). `train.py`
feeds the first to the identity text branch and the second to the clothing alignment loss
(Eq. 1). The pipeline, top to bottom:

1. Load the captions of a dataset (`data.read_annotations`; SynthPEDES is generated if missing).
2. Style clustering (docs/design.md#7-style-clustering, after HAM, Jiang et al. 2025): mask
   attribute words (colours, garments, patterns, body words) so that only the *style skeleton*
   of a caption is left, embed the skeletons with a text encoder (CLIP's when one loads, else
   the offline all-MiniLM-L6-v2), DBSCAN (Ester et al. 1996) with the eps of the k-distance
   curve whose clustering has the best silhouette, noise points to the nearest cluster. The
   clusters are cached beside the output (`helpers/styles.py`; the word lists and the skeleton
   mask are in `helpers/lexicon.py`).
3. A style prompt per cluster, plus two content prompts (identity, clothing).
4. A backend answers: `openai` sends the image (base64 data URL) and the prompts to any
   OpenAI-compatible chat endpoint and asks for JSON (`helpers/mllm.py`); `rules` (offline, no
   key) splits the image's own captions into identity and clothing clauses
   (`lexicon.rules_describe`), and never leaves an image without descriptions (no body words:
   "A man." / "A person.", marked).
5. Validation: the answer parses, both texts are non-empty and within length bounds, the
   identity text names no garment and the clothing text no body trait; else retry with the
   reason appended to the prompt, then record a failure.
6. Output (docs/design.md#the-descriptions): `descriptions.jsonl` beside the annotation file
   (where train.py reads it), one JSON object per image, appended + fsynced as results arrive.
   A rerun skips finished images, retries failed ones, and repairs a line cut short by a kill,
   so nothing is lost or duplicated. Images left failed: exit status 1.

Before the first request the openai backend prints its estimate (requests, tokens, cost at
`mllm.PRICES` or --price-in / --price-out, time at --workers) and asks to go on (y/N), or,
without a terminal, needs --yes.

Run:   python describe.py                          # offline: SynthPEDES + rules backend
       OPENAI_API_KEY=... python describe.py --data cuhk --backend openai --model gpt-4o-mini
       python describe.py --backend openai --base-url http://localhost:8000/v1 --dry-run
Test:  pytest tests/test_describe.py
"""
import argparse
import dataclasses
import json
import os
import re
import sys
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import data
from synthetic import synthpedes
from helpers.lexicon import (body_words, description_quality, garment_words, gender_word, print_quality,
                             rules_describe)
from helpers.mllm import (Answer, DescribeError, OpenAIBackend, ValidationError, confirm, print_cost,
                          print_estimate)
from helpers.styles import print_clusters, style_clusters


# ----------------------------------------------------------------------------------------------
# Prompts: one style prompt per cluster (Sec. III-B), two content prompts.

SYSTEM_PROMPT = ("You annotate pedestrian images for text-based person re-identification. Look "
                 "only at the person in the image. Answer with one JSON object and nothing else.")
IDENTITY_PROMPT = ("Describe the person's identity: gender presentation, approximate age, height "
                   "and build, skin tone, hair colour, length and style, glasses (not sunglasses), "
                   "and other stable body traits. Do not mention clothing, shoes, bags or "
                   "accessories.")
CLOTHING_PROMPT = ("Describe the person's clothing: every garment with its colour and pattern, the "
                   "shoes, bag, hat, sunglasses and other accessories. Call the wearer 'the "
                   "person'; do not mention gender, age, body, skin, hair or glasses (they belong "
                   "to the identity).")


def build_messages(style, image_url, reason=None):
    """Chat-completions messages: system, then the style + content prompts and the image."""
    text = (f"{style}\n\nidentity: {IDENTITY_PROMPT}\nclothing: {CLOTHING_PROMPT}\n\n"
            'Answer as JSON: {"identity": "...", "clothing": "..."}')
    if reason:
        text += f"\n\nYour previous answer was rejected: {reason}. Answer again and fix that."
    return [{"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": [{"type": "text", "text": text},
                                         {"type": "image_url", "image_url": {"url": image_url}}]}]


# ----------------------------------------------------------------------------------------------
# Validation: what makes an answer usable as training text.

def validate_answer(text, min_words=2, max_words=100):
    """Parse an answer and check it; returns (identity, clothing) or raises ValidationError
    whose message is the reason fed back to the model."""
    body = re.sub(r"^```(?:json)?\s*|\s*```$", "", (text or "").strip())
    try:
        answer = json.loads(body)
    except json.JSONDecodeError as err:
        raise ValidationError(f"the answer is not valid JSON ({err.msg})") from None
    if not isinstance(answer, dict):
        raise ValidationError("the answer must be a JSON object")
    texts = []
    for key in ("identity", "clothing"):
        value = answer.get(key)
        if not isinstance(value, str) or not value.strip():
            raise ValidationError(f'"{key}" must be a non-empty string')
        n = len(value.split())
        if not min_words <= n <= max_words:
            raise ValidationError(f'"{key}" has {n} words, expected {min_words} to {max_words}')
        texts.append(" ".join(value.split()))
    identity, clothing = texts
    if garments := garment_words(identity):
        raise ValidationError(f'the identity text names clothing ({", ".join(garments)})')
    if traits := body_words(clothing):
        raise ValidationError(f'the clothing text names body traits ({", ".join(traits)})')
    return identity, clothing


# ----------------------------------------------------------------------------------------------
# Backends. `rules` keeps the captions' own wording, so the style prompt does not apply to it;
# `openai` (helpers/mllm.py) is any OpenAI-compatible chat model with images (docs/design.md#8-gpt-4).

class RulesBackend:
    """The captions split by `rules_describe`, then validated like any answer. An identity text
    that still fails (it names a garment) is replaced by the fallback, so no image is left
    without descriptions."""
    name, model = "rules", "lexicon"

    def __init__(self, cfg):
        self.cfg = cfg

    def describe(self, image_path, captions, style):
        identity, clothing, fallback = rules_describe(captions, self.cfg.max_words)
        try:
            return self._validated(identity, clothing, fallback)
        except ValidationError as err:
            if "identity" not in str(err) or fallback:
                return Answer(error=str(err))
        try:
            return self._validated(f"A {gender_word(captions)}.", clothing, True)
        except ValidationError as err:
            return Answer(error=str(err))

    def _validated(self, identity, clothing, fallback):
        answer = json.dumps({"identity": identity, "clothing": clothing})
        return Answer(*validate_answer(answer, self.cfg.min_words, self.cfg.max_words),
                      identity_fallback=fallback)


# ----------------------------------------------------------------------------------------------
# Output: one JSON line per image, appended and fsynced; a rerun resumes (docs/design.md#the-descriptions).

def load_progress(path):
    """{file_path: record} of the images already described in `path` (missing file: {}), read by
    data.read_descriptions, so that training and this resume agree on what a failure is.

    The file is repaired in place, atomically (temp file + rename), when it holds anything but
    one good line per image: a last line cut short by a kill (no final newline), unreadable
    lines, failed records (they are retried) or duplicates.
    """
    path = Path(path)
    if not path.exists():
        return {}
    text = path.read_text(encoding="utf-8")
    complete = text[:text.rfind("\n") + 1]          # no final newline: the last line is cut short

    def dropped(number, why):
        print(f"{path}:{number}: unreadable line dropped; that image will be described again")
    done = data.read_descriptions(path, on_bad_line=dropped, text=complete)
    if complete != text or len(complete.splitlines()) != len(done):
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in done.values())
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    return done


class JsonlWriter:
    """Appends one record per line; each line is flushed and fsynced before the next."""

    def __init__(self, path):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.fh = open(path, "a", encoding="utf-8")

    def write(self, record):
        self.fh.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.fh.flush()
        os.fsync(self.fh.fileno())

    def close(self):
        self.fh.close()


# ----------------------------------------------------------------------------------------------
# The run: configuration, style clusters, the describe loop, the summary.

SPLIT_CHOICES = ("all",) + data.SPLITS


def _option(default, help, choices=None):
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class DescribeConfig:
    """Every option of the command line (`--field-name`); defaults as documented per line."""
    data: str = _option("synth", "dataset", data.DATASETS)
    root: str = _option("data", "data root, in data.py's layout")
    split: str = _option("all", "images to describe", SPLIT_CHOICES)
    limit: int = _option(0, "only the first N images of the split (0: all)")
    backend: str = _option("rules", "rules: offline caption split; openai: a multimodal chat "
                           "model", ("rules", "openai"))
    model: str = _option("gpt-4o-mini", "chat model of the openai backend")
    base_url: str = _option("", "OpenAI-compatible endpoint, e.g. http://localhost:8000/v1 "
                            "(default: the OpenAI API)")
    workers: int = _option(8, "concurrent requests")
    max_retries: int = _option(5, "retries after a 429, a 5xx or a timeout (the openai client's, "
                               "with its backoff)")
    timeout: float = _option(120.0, "seconds per request")
    validation_retries: int = _option(2, "re-asks after an answer fails validation")
    temperature: float = _option(0.2, "sampling temperature")
    min_words: int = _option(2, "shortest valid description, in words")
    max_words: int = _option(100, "longest valid description, in words")
    price_in: float = _option(-1.0, "USD per 1M prompt tokens (default: the PRICES table)")
    price_out: float = _option(-1.0, "USD per 1M completion tokens")
    request_seconds: float = _option(5.0, "seconds one request takes, for the time estimate")
    yes: bool = _option(False, "send the requests without asking (needed without a terminal)")
    # The paper embeds captions with CLIP's text encoder (here ViT-B/16's); offline, MiniLM.
    style_encoder: str = _option("openai/clip-vit-base-patch16", "CLIP hub name or folder for "
                                 "style embeddings ('minilm': the offline encoder)")
    style_sample: int = _option(4000, "captions used to fit the style clusters")
    # A style is a habit of many annotators (docs/design.md#7-style-clustering)
    min_style_share: float = _option(0.05, "DBSCAN min_samples, as a share of the sample")
    seed: int = _option(0, "seed of the caption sample")
    dry_run: bool = _option(False, "print the prompts of a few images; call and write nothing")


def load_annotations(cfg):
    """data.read_annotations; SynthPEDES is generated with its defaults when missing."""
    try:
        return data.read_annotations(cfg.data, cfg.root)
    except data.DatasetError:
        if cfg.data != "synth":
            raise
    print(f"SynthPEDES not found under {cfg.root}/; generating it (synthpedes.ensure_synthpedes)")
    synthpedes.ensure_synthpedes(cfg.root)
    return data.read_annotations(cfg.data, cfg.root)


def select_records(records, split, limit):
    chosen = [r for r in records if split == "all" or r["split"] == split]
    return chosen[:limit] if limit > 0 else chosen


def print_dry_run(todo, labels, clusters, image_dir, n=3):
    """The prompts the first n images would be sent with; nothing is called or written."""
    for record, label in list(zip(todo, labels))[:n]:
        size = (Path(image_dir) / record["file_path"]).stat().st_size
        messages = build_messages(clusters[label].prompt, f"data:image/...;base64,<{size} bytes>")
        print(f"--- {record['file_path']} (style cluster {label})")
        print(f"[system] {messages[0]['content']}")
        print(f"[user] {messages[1]['content'][0]['text']}")
        print(f"[user] image: {messages[1]['content'][1]['image_url']['url']}")


@dataclass
class Summary:
    described: int = 0
    failed: int = 0
    skipped: int = 0             # done by an earlier run
    prompt_tokens: int = 0
    completion_tokens: int = 0


def describe_images(todo, labels, clusters, backend, image_dir, writer, workers):
    """Describe every image of `todo` (bounded concurrency), writing each result as it arrives."""
    from tqdm import tqdm
    summary = Summary()

    def job(record, label):
        return backend.describe(Path(image_dir) / record["file_path"], record["captions"],
                                clusters[label].prompt)

    pool = ThreadPoolExecutor(max_workers=max(1, workers))
    futures = {pool.submit(job, r, l): (r, l) for r, l in zip(todo, labels)}
    try:
        for future in tqdm(as_completed(futures), total=len(futures), desc="describe",
                           unit="img", file=sys.stderr):
            record, label = futures[future]
            answer = future.result()
            line = {"file_path": record["file_path"], "identity": answer.identity,
                    "clothing": answer.clothing, "style_cluster": label,
                    "backend": backend.name, "model": backend.model}
            if answer.identity_fallback:   # no body trait in the captions: "A man.", "A person."
                line["identity_fallback"] = True
            if answer.error:
                line.update(status="failed", error=answer.error)
            writer.write(line)
            summary.failed += bool(answer.error)
            summary.described += not answer.error
            summary.prompt_tokens += answer.prompt_tokens
            summary.completion_tokens += answer.completion_tokens
    finally:   # on an error or Ctrl-C: drop queued images; finished lines are already on disk
        pool.shutdown(wait=True, cancel_futures=True)
    return summary


def run(cfg):
    """The whole pipeline; returns the Summary. Raises DescribeError / data.DatasetError."""
    annotations = load_annotations(cfg)
    records = select_records(annotations.records, cfg.split, cfg.limit)
    out = data.descriptions_file(cfg.data, cfg.root)   # where train.py and evaluate.py read them
    if not cfg.dry_run:   # the key is checked before any slow work; a dry run needs none
        backend = (OpenAIBackend(cfg, build_messages, validate_answer) if cfg.backend == "openai"
                   else RulesBackend(cfg))
    done = {} if cfg.dry_run else load_progress(out)
    todo = [r for r in records if r["file_path"] not in done]
    print(f"{annotations.name}: {len(records)} images selected ({cfg.split}), "
          f"{len(records) - len(todo)} already described in {out}, {len(todo)} to go")
    summary = Summary(skipped=len(records) - len(todo))
    if todo:
        clusters, labels, report = style_clusters(annotations.records, todo, cfg, out.parent,
                                                  save=not cfg.dry_run)
        print_clusters(clusters, report)
        if cfg.backend == "openai":   # before the first request: what the run will cost
            print_estimate(todo, [build_messages(clusters[label].prompt, "") for label in labels],
                           annotations.image_dir, cfg)
        if cfg.dry_run:
            print_dry_run(todo, labels, clusters, annotations.image_dir)
            return summary
        if cfg.backend == "openai":
            confirm(cfg)
        writer = JsonlWriter(out)
        try:
            summary = describe_images(todo, labels, clusters, backend, annotations.image_dir,
                                      writer, cfg.workers if cfg.backend == "openai" else 1)
        finally:
            writer.close()
        summary.skipped = len(records) - len(todo)
    print_summary(summary, cfg, out)
    described = {k: v for k, v in data.read_descriptions(out).items() if k in
                 {r["file_path"] for r in records}} if out.exists() else {}
    print_quality(description_quality(described))
    if any("attributes" in r for r in records):
        synthpedes.print_agreement(records, described)
    return summary


def print_summary(s, cfg, out):
    print(f"described {s.described}, failed {s.failed}, skipped {s.skipped} (described "
          f"earlier) -> {out}")
    if s.failed:
        print(f"{s.failed} images failed (their lines in {out} say why); rerun the same command "
              "to retry them: finished images are kept")
    if cfg.backend == "openai":
        print_cost(cfg, s.prompt_tokens, s.completion_tokens)


def parse_args(argv=None):
    """Command line -> DescribeConfig: one option per field, typed, choices and ranges checked."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(DescribeConfig):
        flag, meta = "--" + f.name.replace("_", "-"), f.metadata
        if f.type is bool:
            parser.add_argument(flag, action="store_true", help=meta["help"])
        else:
            parser.add_argument(flag, type=f.type, default=f.default, help=meta["help"],
                                choices=meta["choices"])
    cfg = DescribeConfig(**vars(parser.parse_args(argv)))
    for name, ok in [("limit", cfg.limit >= 0), ("workers", cfg.workers >= 1),
                     ("max_retries", cfg.max_retries >= 0), ("style_sample", cfg.style_sample >= 2),
                     ("request_seconds", cfg.request_seconds > 0),
                     ("validation_retries", cfg.validation_retries >= 0),
                     ("min_style_share", 0 < cfg.min_style_share < 1),
                     ("min_words", 1 <= cfg.min_words <= cfg.max_words)]:
        if not ok:
            parser.error(f"--{name.replace('_', '-')} {getattr(cfg, name)} is out of range")
    return cfg


def main(argv=None):
    cfg = parse_args(argv)
    try:
        summary = run(cfg)
    except (DescribeError, data.DatasetError) as err:
        print(f"describe.py: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; finished images are saved, rerun the same command to resume",
              file=sys.stderr)
        return 130
    return 1 if summary.failed else 0   # a script can tell that images are left to retry


if __name__ == "__main__":
    sys.exit(main())
