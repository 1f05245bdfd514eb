"""describe.py's multimodal LLM: any OpenAI-compatible chat endpoint that accepts images, and
what a run on it will cost.

`OpenAIBackend` sends one image (a base64 data URL) with describe.py's prompts, asks for JSON,
and re-asks with the reason when the answer fails describe.py's validation. Before the first
request describe.py prints `print_estimate`: requests, prompt and answer tokens (images by the
512-px tile rule), the cost at the model's list price (PRICES, or --price-in / --price-out) and
the time at --workers concurrent requests; `confirm` then asks to go on (y/N) or, without a
terminal, needs --yes. docs/design.md#the-descriptions says how to point it at a local server.

Used by describe.py.  Test: pytest tests/test_describe.py -k "openai or estimate or cost"
"""
import base64
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path


class DescribeError(Exception):
    """A problem the user can fix (missing key, bad option, unreadable output); no traceback."""


class ValidationError(ValueError):
    """An answer that is not usable as training text; the message is the reason fed back."""


@dataclass
class Answer:
    identity: str = ""
    clothing: str = ""
    error: str = ""          # empty when the answer passed validation
    prompt_tokens: int = 0
    completion_tokens: int = 0
    identity_fallback: bool = False   # the captions name no body trait: "A man.", "A person."


def image_data_url(path):
    mime = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp"}.get(
        Path(path).suffix.lower(), "image/png")
    return f"data:{mime};base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


class OpenAIBackend:
    """The image and prompts to `client.chat.completions.create`, JSON output requested.

    `messages(style, image_url, reason)` builds the chat messages; `validate(text, min_words,
    max_words)` returns (identity, clothing) or raises ValidationError. Transport retries (408,
    409, 429, 5xx, timeouts, refused connections) are the client's own, `max_retries` of them,
    with its exponential backoff and the server's Retry-After. An answer that fails validation
    is asked again with the reason appended, `validation_retries` times, then recorded as a
    failure.
    """
    name = "openai"

    def __init__(self, cfg, messages, validate):
        import openai
        key = os.environ.get("OPENAI_API_KEY", "").strip()
        if not key:
            raise DescribeError("OPENAI_API_KEY is not set. Export the key of your endpoint (any "
                                "non-empty string for a local server), or use --backend rules.")
        self.openai, self.cfg, self.model = openai, cfg, cfg.model
        self.messages, self.validate = messages, validate
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
                text = self._complete(self.messages(style, url, reason), answer)
            except self.openai.APIError as err:   # retries exhausted, or a 4xx for this image
                answer.error = f"{type(err).__name__}: {str(err)[:300]}"
                return answer
            try:
                answer.identity, answer.clothing = self.validate(
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


def print_estimate(todo, messages, image_dir, cfg):
    """The estimate of the requests `todo` will make (estimate_run), from each image's size and
    chat `messages` (one list per image) and the captions' length (an answer is two texts about
    as long as a caption)."""
    from PIL import Image
    sizes, chars = [], []
    for record, message in zip(todo, messages):
        with Image.open(Path(image_dir) / record["file_path"]) as image:
            sizes.append(image.size)
        chars.append(len(message[0]["content"]) + len(message[1]["content"][0]["text"]))
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


def print_cost(cfg, prompt_tokens, completion_tokens):
    """The tokens a run used and what they cost."""
    cost = estimate_cost(cfg.model, prompt_tokens, completion_tokens, cfg.price_in, cfg.price_out)
    price = f"${cost:.4f}" if cost is not None else "unknown (pass --price-in/--price-out)"
    print(f"tokens: {prompt_tokens} prompt + {completion_tokens} completion; estimated cost {price}")
