"""Tests for data.py: SynthPEDES (traits visible in the pixels, clothing independent of identity,
captions, determinism, splits), the three benchmark readers and their errors, transforms,
tokenizer, batches and the P x K identity sampler."""
import hashlib
import json
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import data

PLAIN = {"top": "tank top", "top_colour": "red", "pattern": "plain", "bottom": "trousers",
         "bottom_colour": "blue", "shoes": "sneakers", "shoes_colour": "white", "bag": "none",
         "bag_colour": None, "hat": "none", "hat_colour": None, "scarf_colour": None}
BASE = {"gender": "woman", "height": "average-height", "build": "average", "skin": "fair",
        "hair_colour": "black", "hair_style": "short", "glasses": False, "beard": False}


def render(size=(256, 128), view="front", outfit=PLAIN, **traits):
    """Pixels (H, W, 3) of a plain studio shot and the trait regions of that identity."""
    ident, nuisance = {**BASE, **traits}, data.neutral_nuisance(view)
    pixels = np.asarray(data.render_person(ident, outfit, nuisance, size)).astype(int)
    return pixels, data.body_regions(ident, size, nuisance)


def centre(pixels, box):
    x0, y0, x1, y1 = box
    return pixels[int((y0 + y1) / 2), int((x0 + x1) / 2)]


def mask_of(pixels, rgb, tol=12):
    return (np.abs(pixels - np.array(rgb)).max(-1) <= tol)


# ---- SynthPEDES: identity traits in the pixels ------------------------------------------------

@pytest.mark.parametrize("size", [(128, 64), (256, 128)])
def test_hair_colour_and_skin_tone_show_in_their_regions(size):
    for colour, rgb in data.HAIR_COLOURS.items():
        pixels, reg = render(size, hair_colour=colour)
        assert np.abs(centre(pixels, reg["hair"]) - rgb).max() <= 6, colour
    for tone, rgb in data.SKIN_TONES.items():
        pixels, reg = render(size, skin=tone)
        assert np.abs(centre(pixels, reg["skin"]) - rgb).max() <= 6, tone


def test_height_sets_the_figure_height_in_pixels():
    heights = {}
    for h in data.HEIGHTS:
        pixels, reg = render(height=h)
        rows = np.nonzero((~mask_of(pixels, data.PLAIN_BACKGROUND, 20)).any(1))[0]
        heights[h] = rows.max() - rows.min() + 1
        assert abs(heights[h] - (reg["figure"][3] - reg["figure"][1])) <= 3
    assert heights["short"] < heights["average-height"] < heights["tall"]
    # the ratio of pixel heights is the ratio of the HEIGHTS fractions (within 3%)
    assert heights["tall"] / heights["short"] == pytest.approx(0.88 / 0.72, rel=0.03)


def top_width(pixels, y):
    return mask_of(pixels, data.COLOURS["red"])[int(y)].sum()


def test_build_sets_the_width_and_gender_sets_shoulders_against_hips():
    widths = {}
    for build in data.BUILDS:
        pixels, reg = render(build=build)
        widths[build] = top_width(pixels, (reg["torso"][1] + reg["torso"][3]) / 2)
    assert widths["slim"] < widths["average"] < widths["heavy"]
    shape = {}
    for gender in data.GENDERS:
        pixels, _ = render(gender=gender)
        b = data.body_layout({**BASE, "gender": gender}, (256, 128), data.neutral_nuisance())
        shoulders = top_width(pixels, b.shoulder_y + 2)
        hips = top_width(pixels, b.hip_y - 2)
        shape[gender] = shoulders - hips
    assert shape["man"] > 4 and shape["woman"] < -4  # broad shoulders vs broad hips


def test_hair_style_shows_in_the_shape_of_the_hair():
    masks = {}
    for style in data.HAIR_STYLES:
        pixels, reg = render(hair_style=style)
        masks[style] = mask_of(pixels, data.HAIR_COLOURS["black"])
    x0, y0, x1, y1 = (int(v) for v in reg["head"])
    below_head = {s: m[y1 + 2:, :].sum() for s, m in masks.items()}
    above_head = {s: m[:y0 - 1, :].sum() for s, m in masks.items()}
    beside_head = {s: m[:, x1 + 1:].sum() for s, m in masks.items()}
    on_head = {s: m[y0:y1, x0:x1 + 1].sum() for s, m in masks.items()}
    assert max(below_head, key=below_head.get) == "long"
    assert max(above_head, key=above_head.get) == "bun" and above_head["short"] == 0
    assert max(beside_head, key=beside_head.get) == "ponytail"
    assert on_head["buzz-cut"] < 0.8 * on_head["short"]
    styles = list(masks)
    assert all((masks[a] != masks[b]).any() for a in styles for b in styles if a < b)


def test_glasses_and_beard_show_on_the_face():
    dark = {}
    for glasses in (False, True):
        pixels, reg = render(glasses=glasses, hair_colour="blonde")
        x0, y0, x1, y1 = (int(round(v)) for v in reg["eyes"])
        dark[glasses] = (pixels[y0:y1, x0:x1].max(-1) < 40).mean()
    assert dark[True] > 0.5 and dark[True] > 2 * dark[False]
    pixels, reg = render(gender="man", beard=True, hair_colour="red")
    assert np.abs(centre(pixels, reg["chin"]) - data.HAIR_COLOURS["red"]).max() <= 6
    pixels, reg = render(gender="man", beard=False, hair_colour="red")
    assert np.abs(centre(pixels, reg["chin"]) - data.SKIN_TONES["fair"]).max() <= 6


def test_back_view_shows_hair_where_the_face_would_be():
    pixels, reg = render(view="back", hair_colour="red")
    assert np.abs(centre(pixels, reg["skin"]) - data.HAIR_COLOURS["red"]).max() <= 6


def test_enough_distinct_identities():
    assert data.identity_combinations() >= 1000
    ids = data.sample_identities(3000, seed=1)
    assert len({tuple(i.values()) for i in ids}) == 3000
    assert not any(i["beard"] and i["gender"] == "woman" for i in ids)
    with pytest.raises(ValueError):
        data.sample_identities(data.identity_combinations() + 1, seed=0)


def chi2_independent(a, b):
    """Pearson chi-square test of independence; True unless p < 0.001 (Wilson-Hilferty)."""
    table = np.zeros((len(set(a)), len(set(b))))
    ia, ib = {v: i for i, v in enumerate(sorted(set(a)))}, {v: i for i, v in enumerate(sorted(set(b)))}
    for x, y in zip(a, b):
        table[ia[x], ib[y]] += 1
    expected = table.sum(1, keepdims=True) * table.sum(0, keepdims=True) / table.sum()
    stat, dof = ((table - expected) ** 2 / expected).sum(), (table.shape[0] - 1) * (table.shape[1] - 1)
    z = ((stat / dof) ** (1 / 3) - (1 - 2 / (9 * dof))) / np.sqrt(2 / (9 * dof))
    return z < 3.09


def test_clothing_is_independent_of_identity():
    cfg = data.SynthConfig(num_ids=3000, regime="same-clothes")
    ids = data.sample_identities(cfg.num_ids, cfg.seed)
    outfits = [data.identity_outfits(cfg, pid)[0] for pid in range(cfg.num_ids)]
    assert chi2_independent([i["gender"] for i in ids], [o["top_colour"] for o in outfits])
    assert chi2_independent([i["hair_colour"] for i in ids], [o["bottom"] for o in outfits])
    # the test has power: a dependent pairing is rejected
    assert not chi2_independent([i["gender"] for i in ids],
                                [o["top_colour"] if i["gender"] == "man" else "red" for i, o in zip(ids, outfits)])


# ---- SynthPEDES: captions ---------------------------------------------------------------------

def norm(text):
    return " " + " ".join(data.words(text)) + " "


def test_caption_styles_differ_in_form_not_content():
    rng = random.Random(0)
    for ident in data.sample_identities(40, seed=3):
        outfit = data.sample_outfit(rng)
        p = data.phrases(ident, outfit)
        content = [p[k] for k in ("gender", "height", "build", "skin", "hair", "top", "bottom", "shoes")]
        content += p["extras"] + p["bags"] + p["worn"]
        caps = [data.caption(s, ident, outfit) for s in range(data.NUM_STYLES)]
        for s, c in enumerate(caps):
            for phrase in content:
                assert norm(phrase) in norm(c), (s, phrase, c)
        skeletons = []
        for c in caps:
            rest = norm(c)
            for phrase in sorted(content, key=len, reverse=True):
                rest = rest.replace(norm(phrase), " ")
            skeletons.append(rest.split())
        assert len({tuple(s) for s in skeletons}) == data.NUM_STYLES  # different wording
    assert caps[3] == caps[3].lower() and not any(ch in caps[3] for ch in ",.;:-")


# ---- SynthPEDES: files ------------------------------------------------------------------------

def digest(folder: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            h.update(str(path.relative_to(folder)).encode() + path.read_bytes())
    return h.hexdigest()


def test_same_seed_same_bytes(tmp_path):
    kw = dict(num_ids=5, image_size=(32, 16), regime="cloth-changing", progress=False)
    a = data.generate_synthpedes(tmp_path / "a", seed=7, **kw)
    b = data.generate_synthpedes(tmp_path / "b", seed=7, **kw)
    c = data.generate_synthpedes(tmp_path / "c", seed=8, **kw)
    assert digest(a) == digest(b) != digest(c)


def test_records_store_the_truth_of_each_image(tiny_synth):
    ann = data.read_annotations("synth", tiny_synth)
    for r in ann.records[:12]:
        a = r["attributes"]
        ident, outfit, nuisance = a["identity"], a["clothing"], a["nuisance"]
        assert len(set(r["caption_styles"])) == 2 and set(r["caption_styles"]) <= set(range(data.NUM_STYLES))
        assert r["captions"] == [data.caption(s, ident, outfit) for s in r["caption_styles"]]
        assert (r["identity_text"], r["clothing_text"]) == data.descriptions_of(ident, outfit)
        assert r["processed_tokens"] == [data.words(c) for c in r["captions"]]
        stored = np.asarray(data.load_image(ann.image_dir / r["file_path"]))
        assert stored.shape == (64, 32, 3)
        assert (stored == np.asarray(data.render_person(ident, outfit, nuisance, (64, 32)))).all()


def test_splits_are_identity_disjoint_and_outfits_follow_the_regime(tiny_synth, tmp_path):
    ann = data.read_annotations("synth", tiny_synth)
    ids = {s: {r["id"] for r in ann.records if r["split"] == s} for s in data.SPLITS}
    assert not (ids["train"] & ids["val"] or ids["train"] & ids["test"] or ids["val"] & ids["test"])
    assert [len(ids[s]) for s in data.SPLITS] == [14, 2, 8]
    assert Counter(data.split_identities(300, 0)) == {"train": 180, "val": 30, "test": 90}
    outfits = {}
    for r in ann.records:
        outfits.setdefault(r["id"], set()).add(json.dumps(r["attributes"]["clothing"], sort_keys=True))
    assert all(len(o) == 2 for o in outfits.values())  # cloth-changing: 2 different outfits
    same = data.generate_synthpedes(tmp_path, num_ids=4, image_size=(32, 16), regime="same-clothes",
                                    progress=False)
    recs = json.loads((same / "reid_raw.json").read_text())
    assert {r["outfit"] for r in recs} == {0} and len(recs) == 4 * 4
    with pytest.raises(ValueError, match="same-clothes needs 1 outfit"):
        data.SynthConfig(regime="same-clothes", outfits_per_id=2)
