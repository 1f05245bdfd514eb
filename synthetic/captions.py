"""SynthPEDES's text: the canonical identity / clothing descriptions of an image and its captions,
in five planted annotator styles (0-4, told apart by form) or four realistic ones (5-8, written
as the crowd workers of real benchmarks write). docs/design.md#synthpedes describes both.

Used by synthetic/synthpedes.py.  Test: pytest tests/test_data.py tests/test_realistic.py
"""
from __future__ import annotations

import random
import re


# ----------------------------------------------------------------------------------------------
# SynthPEDES text: canonical identity / clothing descriptions and five annotator styles. Every
# style mentions the same phrases (content); they differ in order, syntax, case and punctuation.

STYLE_NAMES = ("terse list", "verbose sentences", "clothing first", "lower case, no punctuation",
               "labelled fields",  # 0-4: planted, told apart by form; 5-8: realistic, see below
               "realistic: body first, 'is wearing'", "realistic: pronoun and clothes, run-on",
               "realistic: long narrative", "realistic: terse, clothing first")
NUM_STYLES = 5  # planted styles 0-4
_PLURAL = ("trousers", "shorts", "sneakers", "boots", "glasses")


def _a(phrase: str) -> str:
    """Add the indefinite article unless the noun is plural."""
    if phrase.split()[-1] in _PLURAL or phrase.startswith("a "):
        return phrase
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def phrases(identity: dict, outfit: dict) -> dict:
    """The content of every caption, as phrases: one per trait and garment."""
    c, style = identity["hair_colour"], identity["hair_style"]
    hair = f"{c} hair in a {style}" if style in ("ponytail", "bun") else f"{style} {c} hair"
    pattern = f" {outfit['pattern']}" if outfit["pattern"] in ("striped", "checked") else ""
    logo = " with a logo" if outfit["pattern"] == "logo" else ""
    worn = [f"{outfit['hat_colour']} {outfit['hat']}"] if outfit["hat"] != "none" else []
    worn += [f"{outfit['scarf_colour']} scarf"] if outfit["scarf_colour"] else []
    return {"gender": identity["gender"], "height": identity["height"],
            "build": f"{identity['build']} build", "skin": f"{identity['skin']} skin", "hair": hair,
            "extras": ["glasses"] * identity["glasses"] + ["a beard"] * identity["beard"],
            "top": f"{outfit['top_colour']}{pattern} {outfit['top']}{logo}",
            "bottom": f"{outfit['bottom_colour']} {outfit['bottom']}",
            "shoes": f"{outfit['shoes_colour']} {outfit['shoes']}",
            "bags": [f"{outfit['bag_colour']} {outfit['bag']}"] if outfit["bag"] != "none" else [],
            "worn": worn}


def descriptions_of(identity: dict, outfit: dict) -> tuple[str, str]:
    """The canonical identity and clothing descriptions of an image (the ground truth that
    describe.py's identity / clothing texts approximate)."""
    p = phrases(identity, outfit)
    ident = f"{_a(p['height'])} {p['gender']} with {_a(p['build'])}, {p['skin']} and {p['hair']}"
    ident += f", with {_join(p['extras'])}" if p["extras"] else ""
    items = [p["top"], p["bottom"], p["shoes"]] + p["bags"] + p["worn"]
    return ident, _join([_a(x) for x in items])


def caption(style: int, identity: dict, outfit: dict) -> str:
    """One caption of the person in annotator style `style` (0..NUM_STYLES-1)."""
    p = phrases(identity, outfit)
    she, her = ("She", "her") if p["gender"] == "woman" else ("He", "his")
    clothes = [p["top"], p["bottom"], p["shoes"]] + p["worn"]
    body = [p["height"], p["build"], p["skin"], p["hair"]] + p["extras"]
    if style == 0:
        return f"{p['gender'].capitalize()}, " + ", ".join(body) + "; " + ", ".join(clothes + p["bags"]) + "."
    if style == 1:
        out = [f"This is {_a(p['height'])} {p['gender']} with {_a(p['build'])}.",
               f"{she} has {p['skin']} and {p['hair']}."]
        if "glasses" in p["extras"]:
            out.append(f"{she} wears glasses.")
        if "a beard" in p["extras"]:
            out.append(f"{she} has a beard.")
        out.append(f"{she} is dressed in {_a(p['top'])} and {_a(p['bottom'])}, "
                   f"with {_a(p['shoes'])} on {her} feet.")
        if p["bags"]:
            out.append(f"{she} is carrying {_a(p['bags'][0])}.")
        if p["worn"]:
            out.append(f"{she} also wears {_join([_a(w) for w in p['worn']])}.")
        return " ".join(out)
    if style == 2:
        bag = f" and carrying {_a(p['bags'][0])}" if p["bags"] else ""
        looks = [_a(p["build"]), p["skin"], p["hair"]] + p["extras"]
        return (f"Wearing {_join([_a(x) for x in clothes])}{bag}, {_a(p['height'])} {p['gender']} "
                f"with {_join(looks)} walks past the camera.")
    if style == 3:
        bag = ["carrying"] + p["bags"] if p["bags"] else []
        text = " ".join([_a(p["height"]), p["gender"]] + body[1:] + ["wearing"] + clothes + bag)
        return " ".join(words(text))
    if style == 4:
        bag = f" Carrying: {p['bags'][0]}." if p["bags"] else ""
        return (f"Pedestrian: {p['gender']}. Clothes: " + "; ".join(clothes) + f".{bag} Body: "
                + ", ".join(body) + ".")
    raise ValueError(f"caption style {style} not in 0..{NUM_STYLES - 1}")


def words(text: str) -> list[str]:
    """Lower-case word tokens (the `processed_tokens` of CUHK-PEDES)."""
    return re.findall(r"[a-z0-9]+", text.lower())


# ----------------------------------------------------------------------------------------------
# Realistic annotators (docs/design.md#synthpedes, "realistic captions"). Real CUHK-PEDES / ICFG-PEDES
# / RSTPReid captions were written by hundreds of crowd workers: lower-case token streams (the
# `processed_tokens` joined with spaces), typos, run-on sentences, captions that never mention the
# body, scene words, clothing named in many ways, and two captions of one image that disagree.
# Four planted styles (ids 5-8, after the five above) differ only as real annotators do: in word
# choice, order, length and what comes first. `--captions realistic` writes a SynthPEDES with them.

REALISTIC_STYLES = (5, 6, 7, 8)
SAY = {  # ways annotators name a SynthPEDES value
    "t-shirt": ("t-shirt", "tee shirt", "short sleeve shirt"), "shirt": ("shirt", "button up shirt"),
    "jacket": ("jacket", "coat", "zip up jacket"), "hoodie": ("hoodie", "hooded sweatshirt"),
    "tank top": ("tank top", "sleeveless top"), "trousers": ("pants", "trousers", "slacks"),
    "shorts": ("shorts", "knee length shorts"), "skirt": ("skirt", "knee length skirt"),
    "sneakers": ("sneakers", "tennis shoes", "trainers"), "boots": ("boots", "ankle boots"),
    "backpack": ("backpack", "book bag", "rucksack"), "handbag": ("handbag", "purse"),
    "shoulder bag": ("shoulder bag", "messenger bag"), "cap": ("cap", "baseball cap"),
    "beanie": ("beanie", "knit hat"), "grey": ("grey", "gray"), "beige": ("beige", "khaki"),
    "average-height": ("average height", "medium height"), "heavy": ("heavy", "heavyset", "chubby"),
    "slim": ("slim", "thin", "skinny"), "average": ("average", "medium"),
    "buzz-cut": ("buzz cut",), "woman": ("woman", "lady", "female"), "man": ("man", "guy", "male")}
MISSEEN = {"black": "dark grey", "white": "cream", "grey": "silver", "blue": "navy", "red": "maroon",
           "beige": "tan", "brown": "dark brown", "green": "olive", "purple": "violet"}
UNUSUAL_ITEMS = ("a lanyard", "a wristwatch", "a visor", "a fanny pack", "a shawl", "medical scrubs",
                 "a windbreaker", "flip flops", "a wristband", "a tote bag")
SCENES = ("walking down the street", "walking on a cobbled street", "standing on the sidewalk",
          "crossing the road", "walking past a parked car", "standing in front of a building")


def say(value: str, rng: random.Random) -> str:
    """One annotator's word for a value: a synonym, now and then a colour seen wrongly."""
    if value in MISSEEN and rng.random() < 0.15:
        return MISSEEN[value]
    return rng.choice(SAY.get(value, (value,)))


def typo(word: str, rng: random.Random) -> str:
    """Two inner letters swapped or one dropped ("jeans" -> "jenas", "pants" -> "pats")."""
    i = rng.randrange(1, len(word) - 2)
    if rng.random() < 0.5:
        return word[:i] + word[i + 1] + word[i] + word[i + 2:]
    return word[:i] + word[i + 1:]


def realistic_parts(identity: dict, outfit: dict, rng: random.Random) -> dict:
    """Phrases of one caption, each value named by `say` (so two captions of an image disagree)."""
    colour, style = say(identity["hair_colour"], rng), identity["hair_style"]
    hair = {"ponytail": f"{colour} hair in a ponytail", "bun": f"{colour} hair in a bun",
            "buzz-cut": f"a {colour} buzz cut"}.get(style, f"{style} {colour} hair")
    top_pattern = {"striped": "striped ", "checked": "plaid "}.get(outfit["pattern"], "")
    wear = [f"{say(outfit['top_colour'], rng)} {top_pattern}{say(outfit['top'], rng)}",
            f"{say(outfit['bottom_colour'], rng)} {say(outfit['bottom'], rng)}",
            f"{say(outfit['shoes_colour'], rng)} {say(outfit['shoes'], rng)}"]
    if outfit["hat"] != "none":
        wear.append(f"{say(outfit['hat_colour'], rng)} {say(outfit['hat'], rng)}")
    bag = f"{say(outfit['bag_colour'], rng)} {say(outfit['bag'], rng)}" if outfit["bag"] != "none" else ""
    he = "she" if identity["gender"] == "woman" else "he"
    return {"gender": say(identity["gender"], rng), "he": he, "his": "her" if he == "she" else "his",
            "height": say(identity["height"], rng), "build": say(identity["build"], rng),
            "skin": f"{identity['skin']} skin", "hair": hair, "wear": wear, "bag": bag,
            "extra": rng.choice(UNUSUAL_ITEMS) if rng.random() < 0.2 else "",
            "scene": rng.choice(SCENES), "glasses": identity["glasses"], "beard": identity["beard"]}


def _body_first(p: dict, rng: random.Random) -> str:
    """Style 5: gender and hair, then "is wearing" and the clothes; medium length."""
    build = f"{p['build']} " if rng.random() < 0.4 else ""
    text = f"a {build}{p['gender']} with {p['hair']} is wearing a {_join(p['wear'])}"
    text += f" {p['he']} is carrying a {p['bag']}" if p["bag"] else ""
    return text + (f" and {p['extra']}" if p["extra"] else "")


def _pronoun_run_on(p: dict, rng: random.Random) -> str:
    """Style 6: pronoun first, clothes in a run-on with "and", the scene; the body rarely."""
    text = f"{p['he']} is wearing a {p['wear'][0]} with " + " and ".join(p["wear"][1:])
    text += f" and {p['he']} is also carrying a {p['bag']}" if p["bag"] else ""
    text += f" and {p['extra']}" if p["extra"] else ""
    text += f" and {p['he']} is {p['scene']}"
    return text + (f" {p['he']} has {p['hair']}" if rng.random() < 0.3 else "")


def _narrative(p: dict, rng: random.Random) -> str:
    """Style 7: long: "this lady appears to be ...", every clothing item in its own clause."""
    text = (f"this {p['gender']} appears to be {p['height']} and {p['build']} with {p['skin']} and "
            f"{p['hair']} {p['he']} is dressed in a {p['wear'][0]} that fits {p['his']} upper body "
            f"loosely and {p['he']} has on a pair of {p['wear'][1]} along with a pair of {p['wear'][2]}")
    text += "".join(f" and {p['he']} also has a {w} on {p['his']} head" for w in p["wear"][3:])
    text += f" {p['he']} is holding a {p['bag']} in one hand" if p["bag"] else ""
    text += f" {p['he']} is wearing glasses" if p["glasses"] else ""
    text += f" {p['he']} has a beard" if p["beard"] else ""
    return text + f" and {p['he']} seems to be {p['scene']} while looking ahead"


def _terse(p: dict, rng: random.Random) -> str:
    """Style 8: short, clothing first: "man in red jacket black pants ... short black hair"."""
    text = f"{p['gender']} in " + " ".join(p["wear"])
    text += f" with {p['bag']}" if p["bag"] else ""
    return text + f" {p['hair']}"


def realistic_caption(style: int, identity: dict, outfit: dict, rng: random.Random) -> str:
    """One caption in realistic style `style` (REALISTIC_STYLES), as a lower-case token stream
    with a typo in about one word in thirty."""
    writer = dict(zip(REALISTIC_STYLES, (_body_first, _pronoun_run_on, _narrative, _terse)))[style]
    tokens = words(writer(realistic_parts(identity, outfit, rng), rng))
    return " ".join(typo(w, rng) if len(w) >= 4 and rng.random() < 0.03 else w for w in tokens)
