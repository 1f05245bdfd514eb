"""Tests for synthetic/render.py, synthetic/synthpedes.py and data.py: SynthPEDES (traits visible in the pixels,
clothing independent of identity, captions, determinism, splits, its command line), the three
benchmark readers and their errors, transforms, tokenizer, batches and the P x K identity sampler."""
import dataclasses
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
from helpers import lexicon
from helpers import transforms
from synthetic import render
from synthetic import captions
from synthetic import synthpedes
from helpers.encoders import OFFLINE_TEXT_MODEL, EncoderLoadError, load_tokenizer

PLAIN = {"top": "tank top", "top_colour": "red", "pattern": "plain", "bottom": "trousers",
         "bottom_colour": "blue", "shoes": "sneakers", "shoes_colour": "white", "bag": "none",
         "bag_colour": None, "hat": "none", "hat_colour": None, "scarf_colour": None}
BASE = {"gender": "woman", "height": "average-height", "build": "average", "skin": "fair",
        "hair_colour": "black", "hair_style": "short", "glasses": False, "beard": False}


def studio(size=(256, 128), view="front", outfit=PLAIN, **traits):
    """Pixels (H, W, 3) of a plain studio shot and the trait regions of that identity."""
    ident, nuisance = {**BASE, **traits}, synthpedes.neutral_nuisance(view)
    pixels = np.asarray(render.render_person(ident, outfit, nuisance, size)).astype(int)
    return pixels, render.body_regions(ident, size, nuisance)


def centre(pixels, box):
    x0, y0, x1, y1 = box
    return pixels[int((y0 + y1) / 2), int((x0 + x1) / 2)]


def mask_of(pixels, rgb, tol=12):
    return (np.abs(pixels - np.array(rgb)).max(-1) <= tol)


# ---- SynthPEDES: identity traits in the pixels ------------------------------------------------

@pytest.mark.parametrize("size", [(128, 64), (256, 128)])
def test_hair_colour_and_skin_tone_show_in_their_regions(size):
    for colour, rgb in render.HAIR_COLOURS.items():
        pixels, reg = studio(size, hair_colour=colour)
        assert np.abs(centre(pixels, reg["hair"]) - rgb).max() <= 6, colour
    for tone, rgb in render.SKIN_TONES.items():
        pixels, reg = studio(size, skin=tone)
        assert np.abs(centre(pixels, reg["skin"]) - rgb).max() <= 6, tone


def test_height_sets_the_figure_height_in_pixels():
    heights = {}
    for h in render.HEIGHTS:
        pixels, reg = studio(height=h)
        rows = np.nonzero((~mask_of(pixels, render.PLAIN_BACKGROUND, 20)).any(1))[0]
        heights[h] = rows.max() - rows.min() + 1
        assert abs(heights[h] - (reg["figure"][3] - reg["figure"][1])) <= 3
    assert heights["short"] < heights["average-height"] < heights["tall"]
    # the ratio of pixel heights is the ratio of the HEIGHTS fractions (within 3%)
    assert heights["tall"] / heights["short"] == pytest.approx(0.88 / 0.72, rel=0.03)


def top_width(pixels, y):
    return mask_of(pixels, render.COLOURS["red"])[int(y)].sum()


def test_build_sets_the_width_and_gender_sets_shoulders_against_hips():
    widths = {}
    for build in render.BUILDS:
        pixels, reg = studio(build=build)
        widths[build] = top_width(pixels, (reg["torso"][1] + reg["torso"][3]) / 2)
    assert widths["slim"] < widths["average"] < widths["heavy"]
    shape = {}
    for gender in render.GENDERS:
        pixels, _ = studio(gender=gender)
        b = render.body_layout({**BASE, "gender": gender}, (256, 128), synthpedes.neutral_nuisance())
        shoulders = top_width(pixels, b.shoulder_y + 2)
        hips = top_width(pixels, b.hip_y - 2)
        shape[gender] = shoulders - hips
    assert shape["man"] > 4 and shape["woman"] < -4  # broad shoulders vs broad hips


def test_hair_style_shows_in_the_shape_of_the_hair():
    masks = {}
    for style in render.HAIR_STYLES:
        pixels, reg = studio(hair_style=style)
        masks[style] = mask_of(pixels, render.HAIR_COLOURS["black"])
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
        pixels, reg = studio(glasses=glasses, hair_colour="blonde")
        x0, y0, x1, y1 = (int(round(v)) for v in reg["eyes"])
        dark[glasses] = (pixels[y0:y1, x0:x1].max(-1) < 40).mean()
    assert dark[True] > 0.5 and dark[True] > 2 * dark[False]
    pixels, reg = studio(gender="man", beard=True, hair_colour="red")
    assert np.abs(centre(pixels, reg["chin"]) - render.HAIR_COLOURS["red"]).max() <= 6
    pixels, reg = studio(gender="man", beard=False, hair_colour="red")
    assert np.abs(centre(pixels, reg["chin"]) - render.SKIN_TONES["fair"]).max() <= 6


def test_back_view_shows_hair_where_the_face_would_be():
    pixels, reg = studio(view="back", hair_colour="red")
    assert np.abs(centre(pixels, reg["skin"]) - render.HAIR_COLOURS["red"]).max() <= 6


def test_enough_distinct_identities():
    assert synthpedes.identity_combinations() >= 1000
    ids = synthpedes.sample_identities(3000, seed=1)
    assert len({tuple(i.values()) for i in ids}) == 3000
    assert not any(i["beard"] and i["gender"] == "woman" for i in ids)
    with pytest.raises(ValueError):
        synthpedes.sample_identities(synthpedes.identity_combinations() + 1, seed=0)


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
    cfg = synthpedes.SynthConfig(num_ids=3000, regime="same-clothes")
    ids = synthpedes.sample_identities(cfg.num_ids, cfg.seed)
    outfits = [synthpedes.identity_outfits(cfg, pid)[0] for pid in range(cfg.num_ids)]
    assert chi2_independent([i["gender"] for i in ids], [o["top_colour"] for o in outfits])
    assert chi2_independent([i["hair_colour"] for i in ids], [o["bottom"] for o in outfits])
    # the test has power: a dependent pairing is rejected
    assert not chi2_independent([i["gender"] for i in ids],
                                [o["top_colour"] if i["gender"] == "man" else "red" for i, o in zip(ids, outfits)])


# ---- SynthPEDES: captions ---------------------------------------------------------------------

def norm(text):
    return " " + " ".join(captions.words(text)) + " "


def test_caption_styles_differ_in_form_not_content():
    rng = random.Random(0)
    for ident in synthpedes.sample_identities(40, seed=3):
        outfit = synthpedes.sample_outfit(rng)
        p = captions.phrases(ident, outfit)
        content = [p[k] for k in ("gender", "height", "build", "skin", "hair", "top", "bottom", "shoes")]
        content += p["extras"] + p["bags"] + p["worn"]
        caps = [captions.caption(s, ident, outfit) for s in range(captions.NUM_STYLES)]
        for s, c in enumerate(caps):
            for phrase in content:
                assert norm(phrase) in norm(c), (s, phrase, c)
        skeletons = []
        for c in caps:
            rest = norm(c)
            for phrase in sorted(content, key=len, reverse=True):
                rest = rest.replace(norm(phrase), " ")
            skeletons.append(rest.split())
        assert len({tuple(s) for s in skeletons}) == captions.NUM_STYLES  # different wording
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
    a = synthpedes.generate_synthpedes(tmp_path / "a", seed=7, **kw)
    b = synthpedes.generate_synthpedes(tmp_path / "b", seed=7, **kw)
    c = synthpedes.generate_synthpedes(tmp_path / "c", seed=8, **kw)
    assert digest(a) == digest(b) != digest(c)


def test_records_store_the_truth_of_each_image(tiny_synth):
    ann = data.read_annotations("synth", tiny_synth)
    for r in ann.records[:12]:
        a = r["attributes"]
        ident, outfit, nuisance = a["identity"], a["clothing"], a["nuisance"]
        assert len(set(r["caption_styles"])) == 2 and set(r["caption_styles"]) <= set(range(captions.NUM_STYLES))
        assert r["captions"] == [captions.caption(s, ident, outfit) for s in r["caption_styles"]]
        assert (r["identity_text"], r["clothing_text"]) == captions.descriptions_of(ident, outfit)
        assert r["processed_tokens"] == [captions.words(c) for c in r["captions"]]
        stored = np.asarray(data.load_image(ann.image_dir / r["file_path"]))
        assert stored.shape == (64, 32, 3)
        assert (stored == np.asarray(render.render_person(ident, outfit, nuisance, (64, 32)))).all()


def test_splits_are_identity_disjoint_and_outfits_follow_the_regime(tiny_synth, tmp_path):
    ann = data.read_annotations("synth", tiny_synth)
    ids = {s: {r["id"] for r in ann.records if r["split"] == s} for s in data.SPLITS}
    assert not (ids["train"] & ids["val"] or ids["train"] & ids["test"] or ids["val"] & ids["test"])
    assert [len(ids[s]) for s in data.SPLITS] == [14, 2, 8]
    assert Counter(synthpedes.split_identities(300, 0)) == {"train": 180, "val": 30, "test": 90}
    outfits = {}
    for r in ann.records:
        outfits.setdefault(r["id"], set()).add(json.dumps(r["attributes"]["clothing"], sort_keys=True))
    assert all(len(o) == 2 for o in outfits.values())  # cloth-changing: 2 different outfits
    same = synthpedes.generate_synthpedes(tmp_path, num_ids=4, image_size=(32, 16), regime="same-clothes",
                                    progress=False)
    recs = json.loads((same / "reid_raw.json").read_text())
    assert {r["outfit"] for r in recs} == {0} and len(recs) == 4 * 4
    with pytest.raises(ValueError, match="same-clothes needs 1 outfit"):
        synthpedes.SynthConfig(regime="same-clothes", outfits_per_id=2)


# ---- real benchmark readers --------------------------------------------------------------------

def write_benchmark(root: Path, name: str, records: list[dict]) -> Path:
    """Write records in the dataset's exact on-disk format, with a tiny image for each."""
    src = data.SOURCES[name]
    folder = root / src.folder
    for r in records:
        if src.path_key not in r:
            continue
        path = folder / "imgs" / r[src.path_key]
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 16), (200, 0, 0)).save(path)
    (folder / src.annotation).write_text(json.dumps(records))
    return folder


CUHK = [  # ids 1-based; one image with three captions; one identity with a single image
    {"split": "train", "captions": ["A man in a red coat.", "He wears red."], "file_path": "CUHK01/0363004.png",
     "processed_tokens": [["a", "man"], ["he"]], "id": 7},
    {"split": "train", "captions": ["The man has a red coat."], "file_path": "CUHK01/0363003.png",
     "processed_tokens": [["the"]], "id": 7},
    {"split": "train", "captions": ["A woman in blue.", "Blue dress.", "She walks."],
     "file_path": "cam_a/000_45.bmp", "processed_tokens": [["a"], ["b"], ["s"]], "id": 2},
    {"split": "val", "captions": ["A child."], "file_path": "val/1.jpg", "processed_tokens": [["a"]], "id": 11},
    {"split": "test", "captions": ["A tall man.", "Tall man, grey."], "file_path": "test_query/p1.png",
     "processed_tokens": [["a"], ["t"]], "id": 12},
    {"split": "test", "captions": ["A short woman.", "Woman."], "file_path": "test_query/p2.png",
     "processed_tokens": [["a"], ["w"]], "id": 13},
    {"split": "test", "captions": ["Tall man again.", "Grey top."], "file_path": "test_query/p3.png",
     "processed_tokens": [["t"], ["g"]], "id": 12},
]
ICFG = [
    {"id": 5, "file_path": "train/0005/0005_001.jpg", "captions": ["A man with a black bag."], "split": "train"},
    {"id": 9, "file_path": "train/0009/0009_001.jpg", "captions": ["A woman in a skirt."], "split": "train"},
    {"id": 3001, "file_path": "test/3001/3001_001.jpg", "captions": ["A cyclist."], "split": "test"},
]
RSTP = [
    {"id": 0, "img_path": "0000_c14_0031.jpg", "captions": ["A man.", "A person."], "split": "train"},
    {"id": 0, "img_path": "0000_c7_0036.jpg", "captions": ["A man walks.", "Walking man."], "split": "train"},
    {"id": 4, "img_path": "0004_c1_0001.jpg", "captions": ["A woman.", "Lady."], "split": "val"},
    {"id": 8, "img_path": "0008_c2_0003.jpg", "captions": ["A boy.", "Young."], "split": "test"},
]


def test_cuhk_reader(tmp_path):
    write_benchmark(tmp_path, "cuhk", CUHK)
    d = data.load_dataset("cuhk", tmp_path)
    assert d.num_classes == 2 and len(d.train) == 6  # one sample per caption
    assert [(s.pid, s.caption) for s in d.train][:3] == [(1, "A man in a red coat."), (1, "He wears red."),
                                                        (1, "The man has a red coat.")]
    assert d.train[3].pid == 0 and d.train[0].identity is None
    assert Path(d.train[0].image_path) == (tmp_path / "CUHK-PEDES/imgs/CUHK01/0363004.png").resolve()
    assert [g.pid for g in d.gallery] == [12, 13, 12] and len(d.queries) == 6
    assert [q.pid for q in d.queries] == [12, 12, 13, 13, 12, 12]
    val = data.load_dataset("cuhk", tmp_path, eval_split="val")
    assert [(q.caption, q.pid) for q in val.queries] == [("A child.", 11)]


def test_icfg_reader_has_no_val_split(tmp_path):
    write_benchmark(tmp_path, "icfg", ICFG)
    d = data.load_dataset("icfg", tmp_path)
    assert d.num_classes == 2 and [s.pid for s in d.train] == [0, 1]
    assert [(g.pid, Path(g.image_path).name) for g in d.gallery] == [(3001, "3001_001.jpg")]
    with pytest.raises(data.DatasetError, match="no 'val' split"):
        data.load_dataset("icfg", tmp_path, eval_split="val")


def test_rstp_reader_takes_img_path(tmp_path):
    write_benchmark(tmp_path, "rstp", RSTP)
    ann = data.read_annotations("rstp", tmp_path)
    assert ann.records[0]["file_path"] == "0000_c14_0031.jpg" and "img_path" not in ann.records[0]
    d = data.load_dataset("rstp", tmp_path)
    assert d.num_classes == 1 and len(d.train) == 4 and [q.pid for q in d.queries] == [8, 8]


def test_descriptions_are_joined_by_file_path(tmp_path):
    write_benchmark(tmp_path, "rstp", RSTP)
    lines = [{"file_path": "0000_c14_0031.jpg", "identity": "old", "clothing": "old"},
             {"file_path": "0000_c7_0036.jpg", "status": "error", "error": "timeout"},
             {"file_path": "0008_c2_0003.jpg", "identity": "a boy", "clothing": "a red cap", "status": "ok"},
             {"file_path": "0000_c14_0031.jpg", "identity": "a man", "clothing": "a coat"}]  # resumed run
    data.descriptions_file("rstp", tmp_path).write_text("".join(json.dumps(x) + "\n" for x in lines))
    d = data.load_dataset("rstp", tmp_path)
    assert [(s.identity, s.clothing) for s in d.train] == [("a man", "a coat")] * 2 + [(None, None)] * 2
    assert (d.gallery[0].identity, d.gallery[0].clothing) == ("a boy", "a red cap")
    assert data.load_dataset("rstp", tmp_path, descriptions=False).train[0].identity is None


# ---- errors: named file, record, field and fix; no traceback -----------------------------------

@pytest.mark.parametrize("name, words", [("cuhk", ["CUHK-PEDES/reid_raw.json", "request"]),
                                         ("icfg", ["ICFG-PEDES/ICFG-PEDES.json", "SSAN"]),
                                         ("rstp", ["RSTPReid/data_captions.json", "request"]),
                                         ("synth", ["python -m synthetic.synthpedes"])])
def test_missing_dataset_says_where_and_how(tmp_path, name, words):
    with pytest.raises(data.DatasetError) as e:
        data.load_dataset(name, tmp_path)
    for w in words + [str(tmp_path / data.SOURCES[name].folder / "imgs")]:
        assert w in str(e.value)


@pytest.mark.parametrize("index, field, change", [
    (1, "captions", {"captions": []}),
    (2, "id", {"id": "7"}),
    (0, "split", {"split": "training"}),
    (3, "file_path", None),
])
def test_malformed_record_names_file_record_and_field(tmp_path, index, field, change):
    records = [dict(r) for r in CUHK]
    if change is None:
        del records[index][field]
    else:
        records[index].update(change)
    folder = write_benchmark(tmp_path, "cuhk", records)
    with pytest.raises(data.DatasetError) as e:
        data.read_annotations("cuhk", tmp_path)
    msg = str(e.value)
    assert str(folder / "reid_raw.json") in msg and f"record {index}:" in msg and f"'{field}'" in msg


def test_bad_json_missing_and_corrupt_images_are_named(tmp_path):
    folder = write_benchmark(tmp_path, "rstp", RSTP)
    (folder / "imgs" / "0004_c1_0001.jpg").unlink()
    with pytest.raises(data.DatasetError, match=r"missing, e\.g\. .*0004_c1_0001\.jpg"):
        data.load_dataset("rstp", tmp_path)
    corrupt = folder / "imgs" / "0008_c2_0003.jpg"
    corrupt.write_bytes(b"not a jpeg")
    with pytest.raises(data.DatasetError, match="0008_c2_0003.jpg is corrupt"):
        data.load_image(corrupt)
    with pytest.raises(data.DatasetError, match="image not found: .*nope.png"):
        data.load_image(folder / "nope.png")
    (folder / "data_captions.json").write_text("[{")
    with pytest.raises(data.DatasetError, match="data_captions.json: not valid JSON"):
        data.read_annotations("rstp", tmp_path)
    desc = tmp_path / "descriptions.jsonl"
    desc.write_text('{"file_path": "a.jpg", "identity": "x", "clothing": "y"}\n{"file_path": "b.jpg", "iden\n')
    with pytest.raises(data.DatasetError, match="descriptions.jsonl: line 2: not valid JSON"):
        data.read_descriptions(desc)
    desc.write_text('{"file_path": "a.jpg", "identity": "x"}\n')
    with pytest.raises(data.DatasetError, match="line 1: field 'clothing'"):
        data.read_descriptions(desc)


def test_main_prints_dataset_errors_without_traceback(tmp_path):
    run = subprocess.run([sys.executable, "data.py", "--data", "cuhk", "--root", str(tmp_path)],
                         capture_output=True, text=True, cwd=Path(data.__file__).parent)
    assert run.returncode == 2
    assert "CUHK-PEDES not found" in run.stderr and "Traceback" not in run.stderr


# ---- training input -----------------------------------------------------------------------------

def naive_normalised(image, size):
    pixels = np.asarray(image.resize((size[1], size[0]), Image.Resampling.BILINEAR), dtype=np.float64) / 255
    out = (pixels - np.array(transforms.IMAGENET_MEAN)) / np.array(transforms.IMAGENET_STD)  # (H, W, 3)
    return torch.tensor(out.transpose(2, 0, 1), dtype=torch.float32)  # (3, H, W)


def test_eval_transform_matches_a_naive_reference():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 20, 3), dtype=np.uint8))
    x = data.eval_transform((32, 16))(image)
    assert x.shape == (3, 32, 16) and x.dtype == torch.float32
    torch.testing.assert_close(x, naive_normalised(image, (32, 16)), rtol=0, atol=1e-5)


def test_train_transform_flip_pad_crop_and_erase():
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (32, 16, 3), dtype=np.uint8))
    ref = naive_normalised(image, (32, 16))
    flip = transforms.TrainTransform((32, 16), flip_p=1.0, pad=0, erase_p=0.0)
    torch.testing.assert_close(flip(image), ref.flip(-1), rtol=0, atol=1e-5)
    # pad-and-crop: the output is a window of the black-padded image (black = -mean/std)
    black = (-torch.tensor(transforms.IMAGENET_MEAN) / torch.tensor(transforms.IMAGENET_STD)).view(3, 1, 1)
    padded = black.repeat(1, 32 + 6, 16 + 6)
    padded[:, 3:35, 3:19] = ref
    windows = {(i, j) for i in range(7) for j in range(7)}
    crop = transforms.TrainTransform((32, 16), flip_p=0.0, pad=3, erase_p=0.0)
    seen = set()
    torch.manual_seed(0)
    for _ in range(40):
        x = crop(image)
        hits = [(i, j) for i, j in windows if torch.allclose(x, padded[:, i:i + 32, j:j + 16], atol=1e-5)]
        assert hits
        seen.update(hits)
    assert len(seen) > 10  # the offset varies
    erase = transforms.TrainTransform((32, 16))
    for _ in range(20):
        x = torch.randn(3, 32, 16) + 5
        y = erase.erase(x)
        changed = (y != x).any(0)  # (H, W)
        rows, cols = changed.any(1).nonzero()[:, 0], changed.any(0).nonzero()[:, 0]
        box = changed[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
        assert box.all() and changed.sum() == box.numel()  # one rectangle
        assert 0.02 * 0.5 <= box.numel() / (32 * 16) <= 0.4 * 1.5
        assert (y[:, changed] == 0).all()


def test_offline_tokenizer_knows_real_words():
    tok = load_tokenizer()
    enc = data.tokenize(tok, ["A woman with long blonde hair wears a striped jacket.", "man"], max_len=8)
    assert enc["input_ids"].shape == (2, 8) and enc["input_ids"].dtype == torch.long
    tokens = tok.convert_ids_to_tokens(enc["input_ids"][0])
    assert tokens[:4] == ["[CLS]", "a", "woman", "with"] and tokens[-1] == "[SEP]"
    assert tok.unk_token_id not in enc["input_ids"][0].tolist()
    assert enc["attention_mask"][1].tolist() == [1, 1, 1, 0, 0, 0, 0, 0]
    assert load_tokenizer(OFFLINE_TEXT_MODEL).vocab_size == 30522  # bert-base-uncased


def test_unreachable_hub_name_fails_fast_and_says_what_to_pass():
    with pytest.raises(EncoderLoadError, match="Pass a local folder"):
        load_tokenizer("bert-base-uncased-that-is-not-cached")


def test_trainset_and_collate(tiny_synth):
    d = data.load_dataset("synth", tiny_synth)
    ds = data.TrainSet(d.train, data.eval_transform((64, 32)))
    tok = load_tokenizer()
    batch = data.collate([ds[0], ds[5], ds[9]], tok, max_len=32)
    assert batch["images"].shape == (3, 3, 64, 32)
    assert batch["pids"].tolist() == [d.train[i].pid for i in (0, 5, 9)]
    assert set(batch) == {"images", "pids", "identity", "clothing"}  # the caption never reaches the model
    # no descriptions.jsonl: each caption split by the lexicon, as a test query is
    for key, part in (("identity", 0), ("clothing", 1)):
        texts = [lexicon.rules_describe([d.train[i].caption])[part] for i in (0, 5, 9)]
        torch.testing.assert_close(batch[key]["input_ids"], data.tokenize(tok, texts, 32)["input_ids"])
    assert not any(lexicon.garment_words(ds[i]["identity"]) for i in (0, 5, 9))
    described = dataclasses.replace(d.train[0], identity="A tall man.", clothing="A red coat.")
    assert data.TrainSet.texts_of(described) == {"identity": "A tall man.", "clothing": "A red coat."}


def test_identity_sampler_batches_are_p_by_k_and_cover_the_epoch():
    rng = random.Random(0)
    pids = [rng.randrange(30) for _ in range(200)] + [99]  # id 99 has a single sample (< K)
    p, k = 6, 4
    sampler = data.IdentitySampler(pids, p, k, seed=3)
    batches = list(sampler)
    assert len(batches) == len(sampler)
    for batch in batches:
        counts = Counter(pids[i] for i in batch)
        assert len(batch) == p * k and len(counts) == p and set(counts.values()) == {k}
    assert set(i for b in batches for i in b) == set(range(len(pids)))
    assert list(data.IdentitySampler(pids, p, k, seed=3)) == batches  # deterministic
    sampler.set_epoch(1)
    assert list(sampler) != batches
    with pytest.raises(ValueError, match="at least P=7"):
        data.IdentitySampler([0, 1, 2, 3, 4, 5], 7, 2)


def test_identity_sampler_splits_each_batch_into_whole_identities_per_process():
    """With N processes each gets P/N whole identities of the same batch; concatenated in rank
    order the slices are the single process's batches, epoch after epoch."""
    rng = random.Random(1)
    pids = [rng.randrange(40) for _ in range(300)]
    p, k, world = 6, 4, 3
    whole = data.IdentitySampler(pids, p, k, seed=5)
    parts = [data.IdentitySampler(pids, p, k, seed=5, rank=r, world=world) for r in range(world)]
    for epoch in (0, 1):
        for sampler in (whole, *parts):
            sampler.set_epoch(epoch)
        sliced = [list(part) for part in parts]
        assert [sum(batches, []) for batches in zip(*sliced)] == list(whole)
        for batches in sliced:
            assert len(batches) == len(whole)
            assert all(set(Counter(pids[i] for i in b).values()) == {k} and len(b) == p // world * k
                       for b in batches)
        for batches in zip(*sliced):  # no identity in two processes' slices of one batch
            ids = [{pids[i] for i in b} for b in batches]
            assert len(set().union(*ids)) == sum(map(len, ids)) == p
    with pytest.raises(ValueError, match="P=6 identities per batch cannot be split over 4"):
        data.IdentitySampler(pids, 6, 4, rank=0, world=4)


def test_main_generates_once_summarises_and_draws_a_contact_sheet(tmp_path, capsys):
    args = ["--root", str(tmp_path), "--num-ids", "10", "--image-size", "32", "16"]
    synthpedes.main(args)
    out = capsys.readouterr().out
    assert "train       6      36        72" in out and "test        3      18        36" in out
    styles = [int(line.split(": ")[1]) for line in out.splitlines() if line.startswith("captions in style")]
    assert len(styles) == captions.NUM_STYLES and sum(styles) == 10 * 6 * 2
    sheet = tmp_path / "SynthPEDES" / "contact_sheet.png"
    assert f"contact sheet: {sheet}" in out and Image.open(sheet).width == 6 * (16 * 3 + 8)
    stamp = (tmp_path / "SynthPEDES" / "reid_raw.json").stat().st_mtime_ns
    synthpedes.main(args)  # same settings: reused, not regenerated
    assert (tmp_path / "SynthPEDES" / "reid_raw.json").stat().st_mtime_ns == stamp
    descriptions = data.descriptions_file("synth", tmp_path)
    descriptions.write_text('{"file_path": "a.png", "identity": "x y", "clothing": "z w"}\n')
    synthpedes.main(["--root", str(tmp_path)])  # no settings: summarise what is there
    assert "num_ids=10" in capsys.readouterr().out
    with pytest.raises(data.DatasetError, match=r"num_ids 10 \(asked: 300\).*--overwrite"):
        synthpedes.main(["--root", str(tmp_path), "--num-ids", "300"])
    with pytest.raises(data.DatasetError, match=r"image_size \(32, 16\) \(asked: \(24, 12\)\)"):
        synthpedes.main(args[:-2] + ["24", "12"])  # other settings: an error, nothing deleted
    assert descriptions.exists() and (tmp_path / "SynthPEDES" / "reid_raw.json").stat().st_mtime_ns == stamp
    synthpedes.main(args[:-2] + ["24", "12", "--overwrite"])  # replaced only when asked
    assert data.load_image(next((tmp_path / "SynthPEDES" / "imgs").rglob("*.png"))).size == (12, 24)
    assert not descriptions.exists()


def test_train_first_run_generates_and_a_mismatch_is_an_error(tmp_path):
    kw = dict(num_ids=4, image_size=(32, 16), progress=False)
    folder = synthpedes.ensure_synthpedes(tmp_path, **kw)           # missing: generated
    assert synthpedes.ensure_synthpedes(tmp_path, **kw) == folder   # same settings: kept
    with pytest.raises(data.DatasetError, match="regime 'cloth-changing' \\(asked: 'same-clothes'\\)"):
        synthpedes.ensure_synthpedes(tmp_path, **kw, regime="same-clothes")
    with pytest.raises(data.DatasetError, match="already holds a SynthPEDES"):
        synthpedes.generate_synthpedes(tmp_path, **kw)
    (folder / "reid_raw.json").unlink()                       # an interrupted generation ...
    synthpedes.ensure_synthpedes(tmp_path, **kw)                     # ... is not a dataset to keep
    assert (folder / "reid_raw.json").exists()


def test_realistic_captions_change_only_the_captions(tmp_path):
    kw = dict(num_ids=4, image_size=(32, 16), progress=False)
    planted = synthpedes.generate_synthpedes(tmp_path / "p", **kw)
    real = synthpedes.generate_synthpedes(tmp_path / "r", captions="realistic", **kw)
    assert digest(planted / "imgs") == digest(real / "imgs")
    a, b = (json.loads((f / "reid_raw.json").read_text()) for f in (planted, real))
    for x, y in zip(a, b):
        assert x["attributes"] == y["attributes"] and x["captions"] != y["captions"]
        assert set(y["caption_styles"]) <= set(captions.REALISTIC_STYLES)
        assert y["processed_tokens"] == [captions.words(c) for c in y["captions"]]
    assert json.loads((real / "config.json").read_text())["captions"] == "realistic"


def test_more_training_photographs_leave_val_and_test_as_they_were(tmp_path):
    kw = dict(num_ids=10, image_size=(32, 16), progress=False)
    default = synthpedes.generate_synthpedes(tmp_path / "d", **kw)
    more = synthpedes.generate_synthpedes(tmp_path / "m", train_images_per_outfit=5, **kw)
    a, b = (json.loads((f / "reid_raw.json").read_text()) for f in (default, more))
    held_out = lambda records: [r for r in records if r["split"] != "train"]  # noqa: E731
    assert held_out(a) == held_out(b) and held_out(a)
    train = Counter((r["id"], r["outfit"]) for r in b if r["split"] == "train")
    assert set(train.values()) == {5} and len(train) == 3 * len({r["id"] for r in b if r["split"] == "train"})
    for r in a:  # every photograph of the default dataset is there, byte for byte
        assert (default / "imgs" / r["file_path"]).read_bytes() == (more / "imgs" / r["file_path"]).read_bytes()
    with pytest.raises(ValueError, match="train_images_per_outfit"):
        synthpedes.SynthConfig(train_images_per_outfit=0)


@pytest.mark.parametrize("corrupt", [b"this is a text file, not a png\n", "truncated"])
def test_check_decodes_every_image_and_names_a_corrupt_one(tmp_path, corrupt):
    folder = write_benchmark(tmp_path, "cuhk", CUHK)
    bad = folder / "imgs" / "test_query" / "p2.png"
    Image.new("RGB", (64, 128), (10, 200, 30)).save(bad)
    bad.write_bytes(bad.read_bytes()[:60] if corrupt == "truncated" else corrupt)
    data.load_dataset("cuhk", tmp_path)                       # the files exist: no error yet
    with pytest.raises(data.DatasetError, match="p2.png is corrupt"):
        data.check_images(data.read_annotations("cuhk", tmp_path))
    run = subprocess.run([sys.executable, "data.py", "--data", "cuhk", "--root", str(tmp_path)],
                         capture_output=True, text=True, cwd=Path(data.__file__).parent)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1 and str(bad) in run.stderr
