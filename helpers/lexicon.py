"""The caption lexicon: attribute words, style skeletons, and the offline caption splitter.

The attribute words of pedestrian captions (CUHK-PEDES / ICFG-PEDES / RSTPReid wording and
SynthPEDES's) are used three times by `describe.py` (paper Sec. III-B): to mask captions into
*style skeletons* before style clustering (docs/design.md#7-style-clustering, after HAM), to split
captions into identity and clothing clauses (the offline `rules` backend, docs/design.md#8-gpt-4),
and to validate that
neither description leaks into the other; helpers/retrieval.py splits each search query with it too
(`split_query`). Read top to bottom: word lookup (plural, possessive, hyphenated and one-typo
forms), skeletons, the splitter; the word lists themselves are the appendix at the bottom.

Test: pytest tests/test_describe.py -k "lexicon or mask or rules"
"""
import re

# ----------------------------------------------------------------------------------------------
# Lookup: the category of a caption word.

def _deletions(word):
    """The word and every string one deletion away: two words share one when they are at most
    one deletion, insertion, substitution or swap of adjacent letters apart (SymSpell's idea,
    Garbe 2012)."""
    return {word} | {word[:i] + word[i + 1:] for i in range(len(word))}


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
    """Body-trait words named in `text`, glasses included (what a clothing description must not
    contain)."""
    def trait(w):
        return any(v in BODY_TRAITS for v in (w, w.removesuffix("'s"), w.removesuffix("s")))
    return [w for w in WORD_RE.findall(text) if any(map(trait, [w.lower()] + w.lower().split("-")))]


# ----------------------------------------------------------------------------------------------
# The splitter of the offline `rules` backend: the image's own captions -> identity and clothing clauses.

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
    return " ".join(identity), " ".join(clothing) or NO_CLOTHING, fallback


NO_CLOTHING = "The person's clothing is not described."


def split_query(query):
    """A search query (a caption, a Table V string, any text a person types) -> (identity,
    clothing, names_identity), split as `rules_describe` splits an image's captions: the identity
    part is what meets the visual identity, the clothing part ("" when it names no clothing)
    what meets the clothing stream
    (docs/design.md#5-text-side-only-identity-text-meets-the-identity-path). names_identity is False when the query names no
    identity trait ("a red jacket and jeans"); identity is then "A person." (or "A man.", from a
    pronoun). A query with no word in it is a ValueError."""
    if not WORD_RE.search(query or ""):
        raise ValueError(f"query {query!r} has no words: describe the person, e.g. "
                         "'a tall man with short grey hair in a red jacket'")
    identity, clothing, fallback = rules_describe([query])
    return identity, "" if clothing == NO_CLOTHING else clothing, not fallback


# ----------------------------------------------------------------------------------------------
# Checks of written descriptions, printed at the end of describe.py's run.

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


# ----------------------------------------------------------------------------------------------
# Appendix: the word lists.

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
    headband scarf gloves belt sunglasses mask watch necklace earrings bracelet headphones
    earphones clothes clothing outfit attire garment apparel bottoms phone bottle wallet stroller
    bicycle bike tie t scrubs lanyard wristwatch wristband visor shawl poncho windbreaker
    flip-flops flops rucksack fanny pack sole soles tights pullover trench sundress knit zip
    button ankle knee baseball tennis messenger book""")
# t: "t shirt" once punctuation is stripped; knit, zip, button, ankle, knee, baseball, tennis,
# messenger, book: the first word of a garment name ("knit hat", "book bag")
PATTERNS = _words("""striped stripes stripe plaid checked checkered chequered floral flowered
    flowery dotted polka spotted patterned printed print prints logo logos graphic camouflage
    lettering letters writing design designs""")
# Glasses are identity, sunglasses an accessory in GARMENTS (docs/design.md#11-glasses-are-identity)
EYEWEAR = _words("glasses eyeglasses spectacles bespectacled")
# Body traits that never describe clothing: forbidden in a clothing description.
BODY_TRAITS = EYEWEAR | _words("""man men woman women male female boy boys girl girls lady
    ladies gentleman guy hair haired hairstyle hairdo ponytail pigtails bun braid braids
    braided bangs fringe bald balding curly wavy beard bearded moustache mustache skin
    skinned complexion tall height build muscular chubby overweight stocky heavyset plump
    elderly young teenager teen adult child kid age aged middle-aged blond blonde brunette
    redhead buzz buzz-cut buzzcut crew-cut afro dreadlocks""")
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

CONNECTIVES = _words("""and with wearing wears wear wore dressed in carrying carries carry
    holding holds has have having who while also plus but is are was looks appears he she""")
_LEADING = _words("and with in while also plus but who")
# A sentence of one or two words is a fragment ("A large.", "Glasses.") unless it names a person.
PERSON_NOUNS = _words("""man men woman women lady ladies gentleman guy boy girl person pedestrian
    male female child kid adult teen teenager""")
_PREPOSITIONS = _words("on in along down across near by past through at into onto towards toward "
                       "beside from to")
_FINITE = _words("is are was has have wears wear carries holds")
_NEUTRAL = {"he": "the person", "she": "the person", "him": "them", "his": "their", "her": "their",
            "hers": "theirs", "himself": "themselves", "herself": "themselves"}

_TYPO_KEYS = {}
for _category, _vocabulary in reversed(_LEXICON):   # earlier categories win a shared key
    for _word in _vocabulary:
        if len(_word) >= 4 and _category != "pronoun":
            _TYPO_KEYS.update(dict.fromkeys(_deletions(_word), _category))
