"""Tests for describe.py: the style lexicon, eps from the k-distance curve, noise reassignment,
validation, the rules backend on SynthPEDES (style recovery ARI, attribute agreement), the
resumable JSONL output, and the openai backend driven by the real `openai` client against a
chat-completions server on 127.0.0.1 (good, malformed, 429, 500, killed and resumed, no key)."""
import base64
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

import data
import describe
from helpers import lexicon
from helpers import mllm
from helpers import styles
from synthetic import render
from synthetic import captions
from synthetic import synthpedes

KEY = "sk-test-NEVER-PRINT-4242"
REPO = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------------------------
# A chat-completions server on an ephemeral port; `answer(n, request)` -> (status, JSON body).

class FakeChat:
    def __init__(self, answer, delay=0.0, lifetime=60.0):
        self.answer, self.delay = answer, delay
        self.requests, self.auth, self.lock = [], [], threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with fake.lock:
                    n = len(fake.requests)
                    fake.requests.append(request)
                    fake.auth.append(self.headers.get("Authorization"))
                status, payload = fake.answer(n, request)
                time.sleep(fake.delay)
                body = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        class Server(ThreadingHTTPServer):
            def handle_error(self, request, client_address):
                pass   # a client killed mid-request hangs up: nothing to report

        self.server = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()
        self.timer = threading.Timer(lifetime, self.server.shutdown)  # stops itself, always
        self.timer.daemon = True
        self.timer.start()

    def close(self):
        self.timer.cancel()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def chat():
    servers = []

    def start(answer, **kwargs):
        servers.append(FakeChat(answer, **kwargs))
        return servers[-1]
    yield start
    for server in servers:
        server.close()


def completion(content):
    return {"id": "chatcmpl-test", "object": "chat.completion", "created": 0, "model": "m",
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": content}}],
            "usage": {"prompt_tokens": 100, "completion_tokens": 20, "total_tokens": 120}}


def image_tag(request):
    """md5 of the image a request carries: answers name it, so a test can check the pairing."""
    url = request["messages"][1]["content"][1]["image_url"]["url"]
    return hashlib.md5(base64.b64decode(url.split(",", 1)[1])).hexdigest()[:8]


def good(n, request):
    return 200, completion(json.dumps({"identity": f"A tall person with short hair, {image_tag(request)}.",
                                       "clothing": "A red jacket and blue jeans."}))


def error(status):
    return status, {"error": {"message": "try later", "type": "server_error", "code": None}}


@pytest.fixture
def synth_root(tiny_synth, tmp_path):
    """A private copy of the tiny SynthPEDES: describe.py writes beside the dataset."""
    shutil.copytree(Path(tiny_synth) / "SynthPEDES", tmp_path / "SynthPEDES")
    return tmp_path


def descriptions(root):
    """Where describe.py writes and train.py / evaluate.py read."""
    return data.descriptions_file("synth", root)


def run_openai(root, url, *extra):
    return describe.main(["--root", str(root), "--backend", "openai",
                          "--base-url", url, "--style-encoder", "minilm",
                          "--timeout", "10", "--yes", *extra])


def lines(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def file_tag(root, file_path):
    return hashlib.md5((Path(root) / "SynthPEDES" / "imgs" / file_path).read_bytes()).hexdigest()[:8]


# ----------------------------------------------------------------------------------------------
# Lexicon, clustering, validation, rules

def test_mask_style_keeps_form_and_drops_content():
    assert (lexicon.mask_style("An average-height woman with long black hair wears a bright red "
                                "t-shirt, blue jeans and white sneakers.")
            == "A [body] with [body] wears a [garment], [garment] and [garment].")
    # the same sentence about other attributes (and another gender) has the same skeleton
    assert (lexicon.mask_style("A man with short hair wears a plaid shirt and his grey boots.")
            == lexicon.mask_style("A woman with curly brown hair wears a green coat and her shoes."))
    assert lexicon.mask_style("the man walks, slowly") == "the [body] walks, slowly"


def test_lexicon_covers_the_synthpedes_vocabulary():
    for word in render.TOPS + render.BOTTOMS + render.SHOES + ("backpack", "handbag", "bag", "cap", "beanie"):
        assert lexicon.word_category(word.split()[-1]) == "garment", word
    for word in list(render.COLOURS) + list(render.HAIR_COLOURS):   # "blonde" names hair only
        assert lexicon.word_category(word) == ("body" if word == "blonde" else "colour"), word
    for word in render.GENDERS + ("average-height", "tall", "slim", "heavy", "ponytail", "bun",
                                "buzz-cut", "beard", "skin", "build", "glasses"):
        assert lexicon.word_category(word) == "body", word
    assert [lexicon.word_category(w) for w in ("striped", "checked", "logo")] == ["pattern"] * 3


def naive_knee_eps(x, k):
    """k-distance curve and its knee by explicit loops (the reference for k_distance_eps)."""
    n = len(x)
    kd = sorted(sorted(float(np.linalg.norm(x[i] - x[j])) for j in range(n))[k - 1] for i in range(n))
    lo, hi = kd[0], kd[-1]
    gaps = [i / (n - 1) - (kd[i] - lo) / (hi - lo) for i in range(n)]
    return kd[gaps.index(max(gaps))]


def test_k_distance_eps_matches_naive_and_separates_blobs():
    rng = np.random.default_rng(0)
    centres = [(0.0, 0.0), (4.0, 0.0), (0.0, 4.0)]
    blobs = np.concatenate([rng.normal(c, 0.15, (30, 2)) for c in centres])
    x = np.concatenate([blobs, [[2.0, 2.0], [6.0, 6.0], [-3.0, 1.0]]])            # 3 outliers
    eps = styles.k_distance_eps(x, 5)
    assert eps == pytest.approx(naive_knee_eps(x, 5))
    assert 0.1 < eps < 1.0    # above the within-blob spacing, far below the 4.0 between blobs


def test_cluster_styles_sends_noise_to_the_nearest_cluster():
    rng = np.random.default_rng(1)
    big, small = rng.normal((0, 0), 0.1, (40, 2)), rng.normal((3, 0), 0.1, (20, 2))
    noise = np.array([[1.2, 0.3], [2.0, -0.4], [5.0, 0.0]])
    labels, eps, silhouette = styles.cluster_styles(np.concatenate([big, small, noise]), 5)
    assert silhouette > 0.5
    assert (labels[:40] == 0).all() and (labels[40:60] == 1).all()    # ids by size
    assert labels[60:].tolist() == [0, 1, 1]    # nearest blob point: left, right, right


@pytest.mark.parametrize("answer, reason", [
    ('{"identity": "A tall woman", "clothing": "A red coat"}', None),
    ('```json\n{"identity": "A tall woman", "clothing": "A red coat"}\n```', None),
    ("sure! here it is", "not valid JSON"),
    ('["A tall woman", "A red coat"]', "JSON object"),
    ('{"identity": "", "clothing": "A red coat"}', '"identity" must be a non-empty string'),
    ('{"identity": "tall", "clothing": "A red coat"}', '"identity" has 1 words'),
    ('{"identity": "A tall woman in a red coat", "clothing": "A red coat"}', "names clothing (coat)"),
    ('{"identity": "A tall woman", "clothing": "A woman\'s red coat"}', "body traits (woman's)"),
    # glasses are identity (docs/design.md#11-glasses-are-identity); sunglasses are an accessory
    ('{"identity": "A tall woman", "clothing": "A red coat and glasses"}', "body traits (glasses)"),
    ('{"identity": "A tall woman with sunglasses", "clothing": "A red coat"}', "names clothing (sunglasses)"),
])
def test_validate_answer(answer, reason):
    if reason is None:
        assert describe.validate_answer(answer) == ("A tall woman", "A red coat")
    else:
        with pytest.raises(mllm.ValidationError, match=reason.replace("(", r"\(").replace(")", r"\)")):
            describe.validate_answer(answer)


def test_rules_backend_splits_captions_into_identity_and_clothing():
    identity, clothing, fallback = lexicon.rules_describe([   # CUHK-PEDES-like wording
        "The man is wearing a black jacket over a white shirt, dark blue jeans and brown shoes. "
        "He has short black hair and is carrying a backpack."])
    assert identity == "The man. He has short black hair." and not fallback
    assert clothing == ("The person is wearing a black jacket over a white shirt, dark blue jeans "
                        "and brown shoes. The person is carrying a backpack.")
    identity, clothing, _ = lexicon.rules_describe([   # SynthPEDES's unpunctuated style
        "a short man slim build short grey hair glasses a beard wearing green shorts"])
    assert (identity, clothing) == ("A short man slim build short grey hair glasses a beard.",
                                    "Wearing green shorts.")


def test_glasses_go_to_the_identity_text_and_sunglasses_to_the_clothing():
    """Glasses are kept from outfit to outfit, sunglasses are not
    (docs/design.md#11-glasses-are-identity)."""
    backend = describe.RulesBackend(describe.DescribeConfig())
    answer = backend.describe(None, ["The woman wears glasses and a red coat. She has long black "
                                     "hair and is carrying sunglasses in a bag."], style="")
    assert answer.error == "" and not answer.identity_fallback
    assert answer.identity == "The woman wears glasses. She has long black hair."
    assert answer.clothing == "A red coat. The person is carrying sunglasses in a bag."
    identity, clothing, _ = lexicon.rules_describe(["a man in a blue jacket with glasses"])
    assert (identity, clothing) == ("A man, glasses.", "A blue jacket.")


def test_synthpedes_identity_text_with_glasses_is_a_valid_identity_description():
    identities = [i for i in synthpedes.sample_identities(40, seed=0) if i["glasses"]]
    outfit = synthpedes.sample_outfit(random.Random(0))
    for ident in identities:
        identity, clothing = captions.descriptions_of(ident, outfit)
        assert "glasses" in identity.split()
        answer = json.dumps({"identity": identity, "clothing": clothing})
        assert describe.validate_answer(answer) == (identity, clothing)


def test_agreement_counts_glasses_in_the_identity_text_as_right():
    ident = next(i for i in synthpedes.sample_identities(40, seed=0) if i["glasses"])
    outfit = synthpedes.sample_outfit(random.Random(0))
    record = {"file_path": "a.png", "attributes": {"identity": ident, "clothing": outfit}}
    identity, clothing = captions.descriptions_of(ident, outfit)
    right = {"a.png": {"identity": identity, "clothing": clothing}}
    assert synthpedes.attribute_agreement([record], right)["identity"] == 1.0
    # glasses in the clothing text instead: one identity value missed (and leaked), clothing intact
    moved = {"a.png": {"identity": identity.replace(" glasses and", ""), "clothing": clothing + ", glasses"}}
    score = synthpedes.attribute_agreement([record], moved)
    n = len(synthpedes._truth(record["attributes"])["identity"])
    assert score["identity"] == pytest.approx((n - 1) / n) and score["clothing"] == 1.0


def test_rules_backend_on_what_real_captions_do():
    # no body mentioned: the gender of the pronoun, marked as a fallback; no pronoun, no scene
    identity, clothing, fallback = lexicon.rules_describe([
        "he is wearing sunglasses tennis shoes and a grey coat while walking on a cobbled street"])
    assert (identity, fallback) == ("A man.", True)
    assert clothing == "The person is wearing sunglasses tennis shoes and a grey coat."
    identity, _, fallback = lexicon.rules_describe(["wearing a red coat"])
    assert (identity, fallback) == ("A person.", True)
    # a weak body word that modifies a garment is no fragment; typos are still garments
    identity, clothing, _ = lexicon.rules_describe([
        "a tall woman with a large white bag and blue jenas she is carrying a big umbrella"])
    assert identity == "A tall woman."
    assert clothing == ("A large white bag and blue jenas the person is carrying a big "
                        "umbrella.")
    # two long captions: cut to the limit at a clause boundary
    long = ("she is wearing a red coat with a white scarf and black boots and she is carrying a "
            "brown bag and a blue umbrella and a green backpack ") * 3
    identity, clothing, _ = lexicon.rules_describe([long, long.replace("red", "pink")], max_words=40)
    assert len(clothing.split()) <= 40 and clothing.endswith(".") and len(clothing.split()) > 10
    assert not lexicon.body_words(clothing)


def test_rules_backend_never_fails_on_captions_without_body_words():
    cfg = describe.DescribeConfig()
    answer = describe.RulesBackend(cfg).describe("x.png", ["a red coat, blue jeans"], "")
    assert (answer.error, answer.identity, answer.identity_fallback) == ("", "A person.", True)
    answer = describe.RulesBackend(cfg).describe("x.png", ["a man"], "")
    assert not answer.error and answer.clothing == "The person's clothing is not described."


def test_style_prompt_describes_the_cluster_form():
    prompt = styles.style_prompt(3, ["a man walks by", "a woman in a red coat runs"],
                                   "a woman in a red coat runs")
    assert prompt.startswith("Write both texts in annotator style 3: all lower-case, no "
                             "punctuation, about 3 words each.")   # mean 5.5 words, two texts
    assert '"a [body] in a [garment] runs"' in prompt
    assert "sentence case with punctuation" in styles.style_prompt(0, ["A man. Tall."], "A man.")


def test_cost_estimate():
    assert mllm.estimate_cost("gpt-4o-mini-2024-07-18", 1_000_000, 100_000) == pytest.approx(0.21)
    assert mllm.estimate_cost("my-local-llava", 10, 10) is None
    assert mllm.estimate_cost("my-local-llava", 2e6, 1e6, 1.0, 3.0) == pytest.approx(5.0)


@pytest.mark.parametrize("size, model, tokens", [
    ((1024, 1024), "gpt-4o", 765),         # OpenAI's example: down to 768 x 768, 4 tiles: 85 + 4 x 170
    ((2048, 4096), "gpt-4o", 1105),        # OpenAI's example: 1024 x 2048, then 768 x 1536, 6 tiles
    ((64, 128), "gpt-4o", 255),            # a SynthPEDES-sized crop: never scaled up, 1 tile
    ((600, 200), "gpt-4.1", 85 + 2 * 170),   # 2 x 1 tiles
    ((64, 128), "gpt-4o-mini-2024-07-18", 2833 + 5667)])
def test_image_tokens_by_the_tile_rule(size, model, tokens):
    assert mllm.image_tokens(*size, model) == tokens


def test_estimate_by_hand():
    """Two images, 1024 x 1024 and 64 x 128 (765 + 255 image tokens), prompts of 400 and 403
    characters (100 + 101 tokens at 4 a token), 50 answer tokens each, gpt-4o at $2.50 / $10.00
    per 1M: (1,221 x 2.50 + 100 x 10.00) / 1e6 = $0.0040525; 2 workers at 5 s: one round, 5 s."""
    cfg = describe.DescribeConfig(model="gpt-4o", workers=2, request_seconds=5.0)
    e = mllm.estimate_run([400, 403], [(1024, 1024), (64, 128)], 50, cfg)
    assert (e["requests"], e["text_tokens"], e["image_tokens"], e["prompt_tokens"], e["completion_tokens"]) == (
        2, 201, 1020, 1221, 100)
    assert e["cost"] == pytest.approx(0.0040525) and e["seconds"] == 5.0
    cfg = describe.DescribeConfig(model="my-llava", workers=1, request_seconds=3.0, price_in=1.0, price_out=2.0)
    e = mllm.estimate_run([400] * 3, [(64, 128)] * 3, 10, cfg)
    assert e["cost"] == pytest.approx((3 * (100 + 255) * 1.0 + 30 * 2.0) / 1e6) and e["seconds"] == 9.0


def test_load_progress_repairs_a_killed_file(tmp_path):
    out = tmp_path / "descriptions.jsonl"
    ok = [{"file_path": f"a/{i}.png", "identity": "x y", "clothing": "z w"} for i in range(3)]
    failed = {"file_path": "a/9.png", "identity": "", "clothing": "", "status": "failed", "error": "e"}
    text = "".join(json.dumps(r) + "\n" for r in [ok[0], failed, ok[1], ok[1], ok[2]])
    out.write_text(text + '{"file_path": "a/5.png", "ident')                   # cut mid-line
    done = describe.load_progress(out)
    assert sorted(done) == ["a/0.png", "a/1.png", "a/2.png"]                    # failed: retried
    assert lines(out) == ok                                                     # one line each
    writer = describe.JsonlWriter(out)
    writer.write({"file_path": "a/5.png", "identity": "x y", "clothing": "z w"})
    writer.close()
    assert [r["file_path"] for r in lines(out)] == ["a/0.png", "a/1.png", "a/2.png", "a/5.png"]


def tiny_clip_folder(folder):
    """A 1-layer CLIP text tower with a character-level BPE vocabulary, saved like a hub model."""
    import string
    import transformers
    chars = string.ascii_lowercase + string.digits + string.punctuation
    vocab = {t: i for i, t in enumerate(list(chars) + [c + "</w>" for c in chars]
                                         + ["<|startoftext|>", "<|endoftext|>"])}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    transformers.CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt")).save_pretrained(folder)
    config = transformers.CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, projection_dim=16, bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"])
    transformers.CLIPTextModelWithProjection(config).save_pretrained(folder)
    return folder


def test_style_encoder_loads_clip_from_a_folder(tmp_path):
    encoder = styles.load_style_encoder(str(tiny_clip_folder(tmp_path)))
    assert encoder.kind == "clip"
    x = encoder.embed(["a [body] in a [garment].", "wearing a [garment]", "a [body] in a [garment]."])
    assert x.shape == (3, 16) and np.allclose(np.linalg.norm(x, axis=1), 1, atol=1e-5)
    assert np.allclose(x[0], x[2]) and not np.allclose(x[0], x[1])


# ----------------------------------------------------------------------------------------------
# The whole pipeline on SynthPEDES, offline

def test_synthpedes_style_recovery_and_rules_agreement(synth_root, capsys):
    out = descriptions(synth_root)
    assert describe.main(["--root", str(synth_root)]) == 0
    printed = capsys.readouterr().out
    print(printed)
    assert "using the offline all-MiniLM-L6-v2" in printed      # CLIP unreachable offline
    report = json.loads(out.with_name("style_clusters.json").read_text())
    assert report["ari"] > 0.8 and f"ARI {report['ari']:.3f}" in printed
    records = data.read_annotations("synth", synth_root).records
    written = lines(out)
    assert sorted(r["file_path"] for r in written) == sorted(r["file_path"] for r in records)
    assert all(r["backend"] == "rules" and 0 <= r["style_cluster"] < len(report["clusters"])
               for r in written)
    score = synthpedes.attribute_agreement(records, data.read_descriptions(out))
    assert score["identity"] > 0.9 and score["clothing"] > 0.9, score
    # a rerun finds everything done and changes nothing
    before = out.read_bytes()
    assert describe.main(["--root", str(synth_root)]) == 0
    assert out.read_bytes() == before and "96 already described" in capsys.readouterr().out


def test_no_arguments_generates_synthpedes_and_writes_beside_it(tmp_path, monkeypatch, capsys):
    ensure = synthpedes.ensure_synthpedes
    monkeypatch.setattr(synthpedes, "ensure_synthpedes", lambda root: ensure(
        root, num_ids=6, outfits_per_id=2, images_per_outfit=1, image_size=(32, 16), progress=False))
    monkeypatch.chdir(tmp_path)
    assert describe.main([]) == 0
    assert len(lines(tmp_path / "data" / "SynthPEDES" / "descriptions.jsonl")) == 12
    assert "generating it" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------
# The openai backend against a real HTTP server

def test_openai_good_answers(synth_root, tmp_path, chat, monkeypatch, capsys):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    server = chat(good)
    out = descriptions(synth_root)
    assert run_openai(synth_root, server.url, "--limit", "6", "--workers", "3") == 0
    written = lines(out)
    assert len(written) == 6 and len(server.requests) == 6
    for record in written:   # each answer landed on the line of its own image
        assert file_tag(synth_root, record["file_path"]) in record["identity"]
        assert (record["backend"], record["model"], record.get("status")) == ("openai", "gpt-4o-mini", None)
    request = server.requests[0]
    assert request["response_format"] == {"type": "json_object"}
    assert request["messages"][1]["content"][1]["image_url"]["url"].startswith("data:image/png;base64,")
    assert "annotator style" in request["messages"][1]["content"][0]["text"]
    assert server.auth == [f"Bearer {KEY}"] * 6
    printed = capsys.readouterr()
    assert "600 prompt + 120 completion" in printed.out and "$0.0002" in printed.out
    written = [p for p in (synth_root / "SynthPEDES").iterdir() if p.suffix in (".json", ".jsonl")]
    everything = printed.out + printed.err + "".join(p.read_text() for p in written)
    assert KEY not in everything


def test_openai_malformed_answers_are_retried_then_recorded(synth_root, tmp_path, chat, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    server = chat(lambda n, request: (200, completion("I think the person is tall.")))
    out = descriptions(synth_root)
    assert run_openai(synth_root, server.url, "--limit", "2", "--workers", "1",
                      "--validation-retries", "2") == 1          # images left failed: not 0
    assert len(server.requests) == 6                                   # 3 tries per image
    texts = [r["messages"][1]["content"][0]["text"] for r in server.requests]
    assert ["rejected: the answer is not valid JSON" in t for t in texts] == [False, True, True] * 2
    assert [(r["status"], "not valid JSON" in r["error"]) for r in lines(out)] == [("failed", True)] * 2
    fixed = chat(good)                         # a rerun retries the failures, without duplicates
    assert run_openai(synth_root, fixed.url, "--limit", "2") == 0
    assert len(fixed.requests) == 2
    assert [r.get("status") for r in lines(out)] == [None, None]


@pytest.mark.parametrize("status", [429, 500, 503])
def test_transient_errors_are_retried(synth_root, tmp_path, chat, monkeypatch, status):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    server = chat(lambda n, request: error(status) if n < 2 else good(n, request))
    out = descriptions(synth_root)
    assert run_openai(synth_root, server.url, "--limit", "1", "--max-retries", "3") == 0
    assert len(server.requests) == 3 and lines(out)[0].get("status") is None


def test_server_errors_exhaust_retries_and_are_recorded(synth_root, tmp_path, chat, monkeypatch, capsys):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    server = chat(lambda n, request: error(500))
    out = descriptions(synth_root)
    assert run_openai(synth_root, server.url, "--limit", "1", "--max-retries", "2") == 1
    assert len(server.requests) == 3
    record = lines(out)[0]
    assert record["status"] == "failed" and record["error"].startswith("InternalServerError")
    printed = capsys.readouterr().out
    assert "1 images failed" in printed and "rerun the same command to retry them" in printed


def test_rejected_key_stops_the_run_with_a_clear_error(synth_root, tmp_path, chat, monkeypatch, capsys):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    server = chat(lambda n, request: error(401))
    assert run_openai(synth_root, server.url, "--limit", "4", "--workers", "1") == 2
    err = capsys.readouterr().err
    assert "AuthenticationError, HTTP 401" in err and "Traceback" not in err and KEY not in err
    assert len(server.requests) == 1                        # not retried, the rest cancelled


def test_missing_key_is_a_clear_error(synth_root, tmp_path, chat, monkeypatch, capsys):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    server = chat(good)
    assert run_openai(synth_root, server.url) == 2
    err = capsys.readouterr().err
    assert "OPENAI_API_KEY is not set" in err and "Traceback" not in err
    assert not server.requests and not descriptions(synth_root).exists()


def test_dry_run_prints_prompts_and_calls_nothing(synth_root, tmp_path, chat, monkeypatch, capsys):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)           # not needed for a dry run
    server = chat(good)
    assert run_openai(synth_root, server.url, "--dry-run") == 0
    printed = capsys.readouterr().out
    assert printed.count("[system]") == 3 and describe.IDENTITY_PROMPT in printed
    assert not server.requests and not descriptions(synth_root).exists()
    assert not list((synth_root / "SynthPEDES").glob("style_clusters*"))   # nothing written


def test_killed_run_resumes_without_loss_or_duplicates(synth_root, tmp_path, chat, monkeypatch):
    """SIGKILL a describe process mid-run (slow server), cut its last line, resume."""
    server = chat(good, delay=0.3)
    out = descriptions(synth_root)
    env = dict(os.environ, OPENAI_API_KEY=KEY, HF_HUB_OFFLINE="1")
    cmd = [sys.executable, str(REPO / "describe.py"), "--root", str(synth_root),
           "--backend", "openai", "--base-url", server.url, "--style-encoder", "minilm",
           "--limit", "16", "--workers", "2", "--yes"]
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 90
    while time.time() < deadline and proc.poll() is None:
        if out.exists() and out.read_text().count("\n") >= 4:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    first = [json.loads(line) for line in out.read_text().split("\n")[:-1]]   # complete lines
    assert 4 <= len(first) < 16, "the run must be killed midway"
    with open(out, "a") as fh:                     # as if killed in the middle of a write
        fh.write('{"file_path": "0024/0024_o1_1.png", "identity": "A tall')
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    server.delay = 0.0
    assert run_openai(synth_root, server.url, "--limit", "16") == 0
    final = lines(out)
    expected = [r["file_path"] for r in data.read_annotations("synth", synth_root).records[:16]]
    assert sorted(r["file_path"] for r in final) == sorted(expected)          # no loss, no dups
    assert final[:len(first)] == first                                        # kept as written
    assert all(file_tag(synth_root, r["file_path"]) in r["identity"] for r in final)


class Terminal:
    """A stdin that is a terminal and answers `reply` to the prompt."""
    def __init__(self, reply):
        self.reply = reply

    def isatty(self):
        return True

    def readline(self):
        return self.reply + "\n"


def run_asking(root, url, stdin, monkeypatch, *extra):
    """describe.main with the openai backend, without --yes, `stdin` as the terminal or not."""
    monkeypatch.setattr(sys, "stdin", stdin)
    return describe.main(["--root", str(root), "--backend", "openai", "--base-url", url,
                          "--style-encoder", "minilm", "--timeout", "10", "--limit", "3", *extra])


def test_estimate_prints_first_and_nothing_is_sent_without_yes(synth_root, chat, monkeypatch, capsys):
    """No terminal and no --yes: the estimate, a one-line error naming --yes, and the server saw
    no request; at a terminal, anything but y also sends nothing."""
    import io
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    server = chat(good)
    assert run_asking(synth_root, server.url, io.StringIO(), monkeypatch) == 2
    printed = capsys.readouterr()
    assert "estimate for gpt-4o-mini: 3 requests" in printed.out
    assert "list prices as of" in printed.out and "check your provider" in printed.out
    assert "the 512-px tile rule, an estimate" in printed.out and "at 8 concurrent requests of 5 s" in printed.out
    assert printed.err.strip() == ("describe.py: error: no terminal to confirm the estimate above: pass --yes "
                                   "to send the requests")
    assert not server.requests and not descriptions(synth_root).exists()
    assert run_asking(synth_root, server.url, Terminal("n"), monkeypatch) == 2
    assert "stopped before the first request" in capsys.readouterr().err and not server.requests


def test_estimate_then_yes_at_the_terminal_or_the_flag_proceeds(synth_root, chat, monkeypatch, capsys):
    import io
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    server = chat(good)
    assert run_asking(synth_root, server.url, Terminal("y"), monkeypatch) == 0
    out = capsys.readouterr().out
    assert out.index("estimate for gpt-4o-mini") < out.index("described 3") and len(server.requests) == 3
    assert run_asking(synth_root, server.url, io.StringIO(), monkeypatch, "--limit", "5", "--yes",
                      "--price-in", "1", "--price-out", "2") == 0
    assert "estimate for gpt-4o-mini: 2 requests" in capsys.readouterr().out and len(server.requests) == 5
