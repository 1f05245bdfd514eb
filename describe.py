"""Style-guided identity and clothing descriptions from a multimodal LLM (paper Sec. III-B).

For every image of a dataset this script writes two texts: an *identity* description (gender
presentation, age, height, build, skin, hair, glasses) and a *clothing* description (garments,
colours, patterns, shoes, bags, accessories, sunglasses among them). Glasses are identity: a
person keeps them from outfit to outfit (README, design decision 11). `train.py` feeds the first
to the identity text branch and the second to the clothing alignment loss (Eq. 1). The pipeline,
top to bottom:

1. Load the captions of a dataset (`data.read_annotations`; SynthPEDES is generated if missing).
2. Style clustering (DESIGN 3.7, after HAM, Jiang et al. 2025): mask attribute words (colours,
   garments, patterns, body words) so that only the *style skeleton* of a caption is left, embed
   the skeletons with a text encoder (CLIP's when one loads, else the offline all-MiniLM-L6-v2),
   DBSCAN (Ester et al. 1996) with the eps of the k-distance curve whose clustering has the best
   silhouette, noise points to the nearest cluster. The clusters are cached beside the output
   (`helpers/styles.py`; the word lists and the skeleton mask are in `helpers/lexicon.py`).
3. A style prompt per cluster, plus two content prompts (identity, clothing).
4. A backend answers: `openai` sends the image (base64 data URL) and the prompts to any
   OpenAI-compatible chat endpoint and asks for JSON; `rules` (offline, no key) splits the
   image's own captions into identity and clothing clauses (`lexicon.rules_describe`), and
   never leaves an image without descriptions (no body words: "A man." / "A person.", marked).
5. Validation: the answer parses, both texts are non-empty and within length bounds, the
   identity text names no garment and the clothing text no body trait; else retry with the
   reason appended to the prompt, then record a failure.
6. Output (DESIGN 9): `descriptions.jsonl` beside the annotation file (where train.py reads it),
   one JSON object per image, appended + fsynced as results arrive. A rerun skips finished
   images, retries failed ones, and repairs a line cut short by a kill, so nothing is lost or
   duplicated. Images left failed: exit status 1.

Before the first request the openai backend prints its estimate: requests, prompt and answer
tokens (images by the tile rule), the cost at the model's list price (PRICES, or --price-in /
--price-out) and the time at --workers concurrent requests; then it asks to go on (y/N), or,
without a terminal, needs --yes.

Run:   python describe.py                          # offline: SynthPEDES + rules backend
       OPENAI_API_KEY=... python describe.py --data cuhk --backend openai --model gpt-4o-mini
       python describe.py --backend openai --base-url http://localhost:8000/v1 --dry-run
Test:  pytest tests/test_describe.py
"""
import argparse
import base64
import dataclasses
import json
import math
import os
import re
import sys
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import data
from synthetic import synthpedes
from helpers.lexicon import (PERSON_NOUNS, WORD_RE, body_words, garment_words, gender_word, is_fragment, rules_describe,
                     word_category)
from helpers.styles import print_clusters, style_clusters


class DescribeError(Exception):
    """A problem the user can fix (missing key, bad option, unreadable output); no traceback."""


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


def image_data_url(path):
    mime = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp"}.get(
        Path(path).suffix.lower(), "image/png")
    return f"data:{mime};base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


# ----------------------------------------------------------------------------------------------
# Validation: what makes an answer usable as training text.

class ValidationError(ValueError):
    pass


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
# `openai` is any OpenAI-compatible chat endpoint that accepts images (DESIGN 3.8).

@dataclass
class Answer:
    identity: str = ""
    clothing: str = ""
    error: str = ""          # empty when the answer passed validation
    prompt_tokens: int = 0
    completion_tokens: int = 0
    identity_fallback: bool = False   # the captions name no body trait: "A man.", "A person."


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


class OpenAIBackend:
    """The image and prompts to `client.chat.completions.create`, JSON output requested.

    Transport retries (408, 409, 429, 5xx, timeouts, refused connections) are the client's own,
    `max_retries` of them, with its exponential backoff and the server's Retry-After. An answer
    that fails validation is asked again with the reason appended, `validation_retries` times,
    then recorded as a failure.
    """
    name = "openai"

    def __init__(self, cfg):
        import openai
        key = os.environ.get("OPENAI_API_KEY", "").strip()
        if not key:
            raise DescribeError("OPENAI_API_KEY is not set. Export the key of your endpoint (any "
                                "non-empty string for a local server), or use --backend rules.")
        self.openai, self.cfg, self.model = openai, cfg, cfg.model
        self.fatal = None   # set by the first refused request; every later image stops at once
        self.client = openai.OpenAI(api_key=key, base_url=cfg.base_url or None,
                                    max_retries=cfg.max_retries, timeout=cfg.timeout)

    def describe(self, image_path, captions, style):
        if self.fatal:
            raise self.fatal
        answer, reason = Answer(), None
        try:
            url = image_data_url(image_path)
        except OSError as err:
            return Answer(error=f"cannot read the image: {err}")
        for _ in range(self.cfg.validation_retries + 1):
            try:
                text = self._complete(build_messages(style, url, reason), answer)
            except self.openai.APIError as err:   # retries exhausted, or a 4xx for this image
                answer.error = f"{type(err).__name__}: {str(err)[:300]}"
                return answer
            try:
                answer.identity, answer.clothing = validate_answer(
                    text, self.cfg.min_words, self.cfg.max_words)
                return answer
            except ValidationError as err:
                reason = str(err)
        answer.error = f"invalid answer after {self.cfg.validation_retries + 1} tries: {reason}"
        return answer

    def _complete(self, messages, answer):
        """One chat completion (the client retries transient errors); returns the message text."""
        openai = self.openai
        try:
            response = self.client.chat.completions.create(
                model=self.model, messages=messages, temperature=self.cfg.temperature,
                response_format={"type": "json_object"})
        except (openai.AuthenticationError, openai.PermissionDeniedError,
                openai.NotFoundError) as err:  # wrong key, model or URL: stop the whole run
            self.fatal = DescribeError(
                f"the endpoint refused the request ({type(err).__name__}, HTTP "
                f"{err.status_code}); check --base-url, --model and OPENAI_API_KEY")
            raise self.fatal from None
        if response.usage is not None:
            answer.prompt_tokens += response.usage.prompt_tokens or 0
            answer.completion_tokens += response.usage.completion_tokens or 0
        return response.choices[0].message.content if response.choices else ""


# ----------------------------------------------------------------------------------------------
# What a run will cost, printed before its first request: requests, tokens, dollars, time.

# USD per million (input, output) tokens, OpenAI list prices (openai.com/api/pricing) as of
# PRICES_DATE; check your provider's current prices, or pass --price-in / --price-out.
PRICES_DATE = "2025-06"
PRICES = {"gpt-4o": (2.50, 10.00), "gpt-4o-mini": (0.15, 0.60), "gpt-4.1": (2.00, 8.00),
          "gpt-4.1-mini": (0.40, 1.60), "gpt-4.1-nano": (0.10, 0.40),
          "gpt-4-turbo": (10.00, 30.00)}


# Image tokens of the tile rule (OpenAI's vision guide, detail "high", which "auto" picks for
# these images): (base, per 512-px tile); gpt-4o-mini counts more tokens at a lower price.
TILE_TOKENS = {"gpt-4o-mini": (2833, 5667), "": (85, 170)}
CHARS_PER_TOKEN = 4   # English text, roughly (no tokenizer is installed for the estimate)


def prices(model, price_in=-1.0, price_out=-1.0):
    """USD per 1M (prompt, completion) tokens: the flags where given (>= 0), else PRICES for the
    longest model name that `model` starts with; None where neither says."""
    known = [name for name in PRICES if model.startswith(name)]
    default = PRICES[max(known, key=len)] if known else (None, None)
    return (price_in if price_in >= 0 else default[0]), (price_out if price_out >= 0 else default[1])


def estimate_cost(model, prompt_tokens, completion_tokens, price_in=-1.0, price_out=-1.0):
    """Dollars, or None when the model is not in PRICES and no prices were given."""
    p_in, p_out = prices(model, price_in, price_out)
    if p_in is None or p_out is None:
        return None
    return (prompt_tokens * p_in + completion_tokens * p_out) / 1e6


def image_tokens(width, height, model=""):
    """Prompt tokens of one image by the tile rule: scaled down to fit 2048 x 2048, then down
    until its shorter side is at most 768, then base + per_tile * (512-px tiles). An estimate:
    providers other than OpenAI, and newer models, count images their own way."""
    scale = min(1.0, 2048 / max(width, height))
    scale *= min(1.0, 768 / (min(width, height) * scale))
    base, per_tile = TILE_TOKENS[max((n for n in TILE_TOKENS if model.startswith(n)), key=len)]
    return base + per_tile * math.ceil(width * scale / 512) * math.ceil(height * scale / 512)


def estimate_run(prompt_chars, image_sizes, answer_tokens, cfg):
    """The run's estimate: one request per image (re-asks after an invalid answer come on top);
    prompt tokens = the prompt text at CHARS_PER_TOKEN + the image's tiles; answer_tokens each;
    the cost at the model's prices; the time at cfg.workers concurrent requests of
    cfg.request_seconds each."""
    text = sum(math.ceil(n / CHARS_PER_TOKEN) for n in prompt_chars)
    images = sum(image_tokens(w, h, cfg.model) for w, h in image_sizes)
    requests = len(image_sizes)
    return dict(requests=requests, text_tokens=text, image_tokens=images, prompt_tokens=text + images,
                completion_tokens=answer_tokens * requests,
                cost=estimate_cost(cfg.model, text + images, answer_tokens * requests, cfg.price_in, cfg.price_out),
                seconds=math.ceil(requests / cfg.workers) * cfg.request_seconds)


def print_estimate(todo, labels, clusters, image_dir, cfg):
    """The estimate of the requests `todo` will make (estimate_run), from each image's size and
    prompt and the captions' length (an answer is two texts about as long as a caption)."""
    from PIL import Image
    sizes, chars = [], []
    for record, label in zip(todo, labels):
        with Image.open(Path(image_dir) / record["file_path"]) as image:
            sizes.append(image.size)
        messages = build_messages(clusters[label].prompt, "")
        chars.append(len(messages[0]["content"]) + len(messages[1]["content"][0]["text"]))
    words = [len(c.split()) for r in todo for c in r["captions"]] or [30]
    answer = round(2 * 1.3 * sum(words) / len(words)) + 12   # 1.3 tokens a word, JSON around it
    e = estimate_run(chars, sizes, answer, cfg)
    p_in, p_out = prices(cfg.model, cfg.price_in, cfg.price_out)
    source = ("as given" if min(cfg.price_in, cfg.price_out) >= 0
              else f"list prices as of {PRICES_DATE}, check your provider")
    cost = (f"${e['cost']:.4f} at ${p_in} / ${p_out} per 1M prompt / answer tokens ({source})"
            if e["cost"] is not None else "unknown: pass --price-in and --price-out (USD per 1M tokens)")
    print(f"estimate for {cfg.model}: {e['requests']} requests (one per image; re-asks of invalid answers "
          f"come on top); {e['prompt_tokens']:,} prompt tokens ({e['text_tokens']:,} text at "
          f"{CHARS_PER_TOKEN} characters a token, {e['image_tokens']:,} image: the 512-px tile rule, an "
          f"estimate) and {e['completion_tokens']:,} answer tokens; cost {cost}; time "
          f"{e['seconds'] / 60:.1f} min at {cfg.workers} concurrent requests of {cfg.request_seconds:g} s")
    return e


def confirm(cfg):
    """Go on only when the user says so: --yes, or 'y' at the terminal's prompt. DescribeError
    without a terminal (a script or a job must pass --yes) and on any other answer."""
    if cfg.yes:
        return
    if not sys.stdin.isatty():
        raise DescribeError("no terminal to confirm the estimate above: pass --yes to send the requests")
    if input("send these requests? [y/N] ").strip().lower() not in ("y", "yes"):
        raise DescribeError("stopped before the first request; nothing was sent")


# ----------------------------------------------------------------------------------------------
# Output: one JSON line per image, appended and fsynced; a rerun resumes (DESIGN 9).

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
    # A style is a habit shared by a sizeable group of annotators: DBSCAN's min_samples (the k of
    # the k-distance curve) is this share of the sample; 5% recovers SynthPEDES's planted styles.
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
        backend = (OpenAIBackend if cfg.backend == "openai" else RulesBackend)(cfg)
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
            print_estimate(todo, labels, clusters, annotations.image_dir, cfg)
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
        cost = estimate_cost(cfg.model, s.prompt_tokens, s.completion_tokens,
                             cfg.price_in, cfg.price_out)
        price = f"${cost:.4f}" if cost is not None else "unknown (pass --price-in/--price-out)"
        print(f"tokens: {s.prompt_tokens} prompt + {s.completion_tokens} completion; "
              f"estimated cost {price}")


def _sentences(text):
    return [t for t in re.split(r"(?<=[.!?])\s+", text.strip()) if t]


def description_quality(descriptions):
    """Shares of the described images (file_path -> record) whose identity text names clothing,
    holds a fragment (`is_fragment`), names no body trait besides a gender word, or came from
    the fallback; and whose clothing text holds a gendered pronoun or a scene word."""
    def share(test, side):
        return sum(map(test, (d[side] for d in descriptions.values()))) / max(1, len(descriptions))

    def categories(text):
        return {word_category(w) for w in WORD_RE.findall(text) if w.lower() not in PERSON_NOUNS}
    return {"images": len(descriptions),
            "identity_clothing": share(lambda t: bool(categories(t) & {"garment", "pattern"}),
                                       "identity"),
            "identity_fragment": share(lambda t: any(map(is_fragment, _sentences(t))), "identity"),
            "identity_no_trait": share(lambda t: "body" not in categories(t), "identity"),
            "identity_fallback": sum(bool(d.get("identity_fallback"))
                                     for d in descriptions.values()) / max(1, len(descriptions)),
            "clothing_pronoun_or_scene": share(lambda t: bool(categories(t) & {"pronoun", "scene"}),
                                               "clothing")}


def print_quality(q):
    print(f"description checks over {q['images']} images: identity texts naming clothing "
          f"{q['identity_clothing']:.1%}, with a fragment {q['identity_fragment']:.1%}, with no "
          f"body trait but a gender {q['identity_no_trait']:.1%} (fallback, no body words in the "
          f"captions: {q['identity_fallback']:.1%}); clothing texts with a pronoun or a scene "
          f"word {q['clothing_pronoun_or_scene']:.1%}")


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
