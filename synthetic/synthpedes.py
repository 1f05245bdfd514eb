"""SynthPEDES: a procedural pedestrian dataset in which identity and clothing are known factors.

Identity traits (gender presentation, height, build, skin tone, hair colour and style, glasses,
beard; 8,100 combinations) are drawn once per identity; outfits (top, pattern, bottom, shoes, bag,
hat, scarf) from their own random stream; nuisance (viewpoint, stride, scale, position, clutter,
light, occluders) per image (docs/design.md#synthpedes). `synthetic/render.py` draws the pixels.
Each image gets two captions (`synthetic/captions.py`) in two of five annotator styles that
differ in form, not content, or (`--captions realistic`) in two of four styles written like real
annotators: lower-case token streams, typos, run-ons, no body mentioned, captions that disagree.
Written in the CUHK-PEDES `reid_raw.json` format; training sees SynthPEDES only through that file
(`data.py` reads it).

Read top to bottom: random streams (identities, outfits, nuisance), generation, agreement of any
identity / clothing descriptions with the truth, the command line.

Run:  python -m synthetic.synthpedes                     generate (if missing), summarise, draw a contact sheet
      python -m synthetic.synthpedes --root data-real --captions realistic   real annotators' captions
      python -m synthetic.synthpedes --bench             generation rate (images/s)
Test: pytest tests/test_data.py tests/test_realistic.py
"""
from __future__ import annotations

import argparse
import json
import random
import re
import shutil
import sys
import tempfile
import textwrap
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from data import Annotations, DatasetError, load_image, report, run_command
from synthetic.captions import (NUM_STYLES, REALISTIC_STYLES, STYLE_NAMES, caption, descriptions_of,
                                realistic_caption, words)
from synthetic.render import (BAGS, BOTTOMS, BUILDS, COLOURS, GENDERS, HAIR_COLOURS, HAIR_STYLES, HATS, HEIGHTS,
                    PATTERNS, SHOE_COLOURS, SHOES, SKIN_TONES, TOPS, VIEWS, render_person)


# ----------------------------------------------------------------------------------------------
# Random streams: identities (once per person), outfits (per identity index), nuisance (per image).

def identity_combinations() -> int:
    """How many distinct identities the traits can express: 8,100."""
    looks = len(HEIGHTS) * len(BUILDS) * len(SKIN_TONES) * len(HAIR_COLOURS) * len(HAIR_STYLES) * 2  # x glasses
    return looks * (1 + 2)  # a woman has no beard; a man has one or not


def sample_identities(num_ids: int, seed: int) -> list[dict]:
    """`num_ids` pairwise-distinct trait combinations, from the identity random stream."""
    if num_ids > identity_combinations():
        raise ValueError(f"num_ids={num_ids} exceeds the {identity_combinations()} trait combinations")
    rng, seen, out = random.Random(f"{seed}/identities"), set(), []
    while len(out) < num_ids:
        gender = rng.choice(GENDERS)
        ident = {"gender": gender, "height": rng.choice(list(HEIGHTS)), "build": rng.choice(list(BUILDS)),
                 "skin": rng.choice(list(SKIN_TONES)), "hair_colour": rng.choice(list(HAIR_COLOURS)),
                 "hair_style": rng.choice(HAIR_STYLES), "glasses": rng.random() < 0.5,
                 "beard": gender == "man" and rng.random() < 0.5}
        key = tuple(ident.values())
        if key not in seen:
            seen.add(key)
            out.append(ident)
    return out


def sample_outfit(rng: random.Random) -> dict:
    """One outfit. Drawn from a stream seeded by (seed, identity index) only, never by traits."""
    c = list(COLOURS)
    bag, hat = rng.choice(BAGS), rng.choice(HATS)
    return {"top": rng.choice(TOPS), "top_colour": rng.choice(c), "pattern": rng.choice(PATTERNS),
            "bottom": rng.choice(BOTTOMS), "bottom_colour": rng.choice(c),
            "shoes": rng.choice(SHOES), "shoes_colour": rng.choice(SHOE_COLOURS),
            "bag": bag, "bag_colour": rng.choice(c) if bag != "none" else None,
            "hat": hat, "hat_colour": rng.choice(c) if hat != "none" else None,
            "scarf_colour": rng.choice(c) if rng.random() < 0.2 else None}


def sample_nuisance(rng: random.Random) -> dict:
    """Viewpoint, pose, framing, clutter, light and occlusion of one photograph."""
    return {"view": rng.choices(VIEWS, weights=(0.4, 0.3, 0.3))[0], "mirror": rng.random() < 0.5,
            "stride": rng.uniform(0.0, 0.07), "scale": rng.uniform(0.93, 1.05),
            "dx": rng.uniform(-0.1, 0.1), "dy": rng.uniform(-0.02, 0.02),
            "background": rng.randrange(2**31), "brightness": rng.uniform(0.7, 1.15),
            "tint": [rng.uniform(0.92, 1.08) for _ in range(3)], "occluder": rng.random() < 0.25}


def neutral_nuisance(view: str = "front") -> dict:
    """A plain studio shot: no clutter, no jitter, no light change (for tests and figures)."""
    return {"view": view, "mirror": False, "stride": 0.0, "scale": 1.0, "dx": 0.0, "dy": 0.0,
            "background": None, "brightness": 1.0, "tint": [1.0, 1.0, 1.0], "occluder": False}


# ----------------------------------------------------------------------------------------------
# SynthPEDES generation: identities -> outfits -> images -> reid_raw.json records.

@dataclass
class SynthConfig:
    """SynthPEDES defaults: sized so that train.py on 2 CPU cores finishes in minutes."""
    num_ids: int = 300  # 180 / 30 / 90 ids in train / val / test (SPLIT_FRACTIONS)
    outfits_per_id: int | None = None  # None: 1 for same-clothes, 3 for cloth-changing
    images_per_outfit: int | None = None  # None: 4 for same-clothes, 2 for cloth-changing
    image_size: tuple[int, int] = (128, 64)  # (H, W): the 2:1 pedestrian box (IRRA uses 384x128)
    regime: str = "cloth-changing"  # or "same-clothes" (one outfit per id, like CUHK-PEDES)
    seed: int = 0
    captions: str = "planted"  # or "realistic": the annotators of real benchmarks (styles 5-8)
    # more photographs of each outfit for the training identities only (None: images_per_outfit);
    # the validation and test images stay exactly those of the default dataset
    train_images_per_outfit: int | None = None

    def __post_init__(self):
        if self.regime not in ("same-clothes", "cloth-changing"):
            raise ValueError(f"regime must be same-clothes or cloth-changing, not {self.regime!r}")
        if self.captions not in ("planted", "realistic"):
            raise ValueError(f"captions must be planted or realistic, not {self.captions!r}")
        changing = self.regime == "cloth-changing"
        if self.outfits_per_id is None:
            self.outfits_per_id = 3 if changing else 1
        if self.images_per_outfit is None:
            self.images_per_outfit = 2 if changing else 4
        if self.outfits_per_id != 1 and not changing or self.outfits_per_id < 2 and changing:
            raise ValueError(f"regime {self.regime} with outfits_per_id={self.outfits_per_id}: "
                             "same-clothes needs 1 outfit per id, cloth-changing at least 2")
        if self.num_ids < 3:
            raise ValueError("num_ids must be at least 3 (one identity per split)")
        if self.train_images_per_outfit is not None and self.train_images_per_outfit < 1:
            raise ValueError(f"train_images_per_outfit must be at least 1, got {self.train_images_per_outfit}")
        self.image_size = tuple(self.image_size)

    def images_per_outfit_of(self, split: str) -> int:
        if split == "train" and self.train_images_per_outfit is not None:
            return self.train_images_per_outfit
        return self.images_per_outfit


SPLIT_FRACTIONS = (0.6, 0.1, 0.3)  # train / val / test identities; CUHK-PEDES is ~85/7.5/7.5


def split_identities(num_ids: int, seed: int) -> list[str]:
    """The split of each identity index: a seeded shuffle cut by SPLIT_FRACTIONS."""
    order = list(range(num_ids))
    random.Random(f"{seed}/split").shuffle(order)
    n_val = max(1, round(SPLIT_FRACTIONS[1] * num_ids))
    n_train = min(num_ids - n_val - 1, max(1, round(SPLIT_FRACTIONS[0] * num_ids)))
    split = [""] * num_ids
    for rank, i in enumerate(order):
        split[i] = "train" if rank < n_train else "val" if rank < n_train + n_val else "test"
    return split


def identity_outfits(cfg: SynthConfig, pid: int) -> list[dict]:
    """The outfits of one identity; in cloth-changing each has a different top."""
    rng, outfits = random.Random(f"{cfg.seed}/clothing/{pid}"), []
    while len(outfits) < cfg.outfits_per_id:
        outfit = sample_outfit(rng)
        if all((o["top"], o["top_colour"]) != (outfit["top"], outfit["top_colour"]) for o in outfits):
            outfits.append(outfit)
    return outfits


def synth_records(cfg: SynthConfig):
    """Yield (record, image) for every SynthPEDES image, in a fixed order."""
    identities, splits = sample_identities(cfg.num_ids, cfg.seed), split_identities(cfg.num_ids, cfg.seed)
    for pid, ident in enumerate(identities):
        for o, outfit in enumerate(identity_outfits(cfg, pid)):
            id_text, clo_text = descriptions_of(ident, outfit)
            for k in range(cfg.images_per_outfit_of(splits[pid])):
                rng = random.Random(f"{cfg.seed}/image/{pid}/{o}/{k}")
                nuisance, styles = sample_nuisance(rng), rng.sample(range(NUM_STYLES), 2)
                caps = [caption(s, ident, outfit) for s in styles]
                if cfg.captions == "realistic":  # two annotators, each with a style of their own
                    rng = random.Random(f"{cfg.seed}/realistic/{pid}/{o}/{k}")
                    styles = rng.choices(REALISTIC_STYLES, k=2)
                    caps = [realistic_caption(s, ident, outfit, rng) for s in styles]
                record = {"split": splits[pid], "captions": caps,
                          "file_path": f"{pid + 1:04d}/{pid + 1:04d}_o{o}_{k}.png",
                          "processed_tokens": [words(c) for c in caps], "id": pid + 1,
                          "caption_styles": styles, "outfit": o, "identity_text": id_text,
                          "clothing_text": clo_text,
                          "attributes": {"identity": ident, "clothing": outfit, "nuisance": nuisance}}
                yield record, render_person(ident, outfit, nuisance, cfg.image_size)


def generate_synthpedes(root="data", num_ids=300, outfits_per_id=None, images_per_outfit=None,
                        image_size=(128, 64), regime="cloth-changing", seed=0, captions="planted",
                        train_images_per_outfit=None, overwrite=False, progress=True) -> Path:
    """Write <root>/SynthPEDES/{reid_raw.json, imgs/, config.json}; return the folder.
    Same arguments, same bytes. A SynthPEDES already there (with its descriptions) is replaced
    only when `overwrite` is set; otherwise that is a DatasetError. Leftovers of an interrupted
    generation (no reid_raw.json, no descriptions) are cleared."""
    cfg = SynthConfig(num_ids, outfits_per_id, images_per_outfit, image_size, regime, seed, captions,
                      train_images_per_outfit)
    folder = Path(root) / "SynthPEDES"
    if holds_dataset(folder) and not overwrite:
        raise DatasetError(f"{folder} already holds a SynthPEDES; it is kept. Pass --overwrite "
                           "(overwrite=True) to replace it and its descriptions, or use another --root.")
    if folder.exists():
        shutil.rmtree(folder)
    (folder / "imgs").mkdir(parents=True)
    splits = split_identities(cfg.num_ids, cfg.seed)
    records, total = [], cfg.outfits_per_id * sum(cfg.images_per_outfit_of(s) for s in splits)
    for i, (record, image) in enumerate(synth_records(cfg)):
        path = folder / "imgs" / record["file_path"]
        path.parent.mkdir(exist_ok=True)
        image.save(path, format="PNG")
        records.append(record)
        if progress and (i + 1) % 500 == 0:
            print(f"  rendered {i + 1}/{total} images", file=sys.stderr)
    (folder / "reid_raw.json").write_text(json.dumps(records, indent=1))
    (folder / "config.json").write_text(json.dumps(asdict(cfg), indent=1))
    return folder


def holds_dataset(folder: Path) -> bool:
    """True when a SynthPEDES folder holds something worth keeping: annotations or descriptions."""
    return (folder / "reid_raw.json").exists() or (folder / "descriptions.jsonl").exists()


def saved_synth_config(folder: Path) -> SynthConfig | None:
    """The settings a SynthPEDES folder was made with (None if unreadable). Fields added since it
    was made take their defaults, so an older dataset still matches."""
    try:
        return SynthConfig(**json.loads((folder / "config.json").read_text()))
    except (OSError, ValueError, TypeError):
        return None


def ensure_synthpedes(root="data", progress=True, overwrite=False, **kwargs) -> Path:
    """Generate SynthPEDES unless <root>/SynthPEDES already holds one made with these settings.
    One made with other settings is a DatasetError that names the difference, unless `overwrite`."""
    folder, cfg = Path(root) / "SynthPEDES", SynthConfig(**kwargs)
    saved = saved_synth_config(folder)
    if saved == cfg and (folder / "reid_raw.json").exists():
        return folder
    if holds_dataset(folder) and not overwrite:
        diff = ", ".join(f"{k} {v!r} (asked: {asdict(cfg)[k]!r})" for k, v in asdict(saved).items()
                         if v != asdict(cfg)[k]) if saved else "unknown settings, no config.json"
        flags = " ".join(f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, tuple) else v}"
                         for k, v in asdict(cfg).items() if v is not None)
        raise DatasetError(f"{folder} holds a SynthPEDES made with other settings: {diff}. It is "
                           f"kept, with its descriptions. Use another --root, or replace both with "
                           f"`python -m synthetic.synthpedes --root {root} {flags} --overwrite`.")
    if progress:
        print(f"generating SynthPEDES in {folder}" + (" (replacing one made with other settings, "
              "and its descriptions)" if holds_dataset(folder) else ""), file=sys.stderr)
    return generate_synthpedes(root, **asdict(cfg), overwrite=True, progress=progress)


# ----------------------------------------------------------------------------------------------
# Agreement with the ground truth: how well any identity / clothing descriptions (describe.py's,
# of any backend) name each image's true attribute values on the right side.

def _truth(attributes):
    """SynthPEDES attributes -> {"identity": [value words], "clothing": [...]}. Glasses are
    identity, as they are drawn (once per person) and in describe.py
    (docs/design.md#11-glasses-are-identity); "plain" and "none" are never written in captions."""
    ident, clothes = attributes["identity"], attributes["clothing"]
    values = {"identity": [ident[k] for k in ("gender", "height", "build", "skin", "hair_colour",
                                              "hair_style")]
              + ["glasses"] * bool(ident.get("glasses")) + ["beard"] * bool(ident.get("beard")),
              "clothing": [v for k, v in clothes.items() if isinstance(v, str)
                           and v not in ("none", "plain")]
              + ["scarf"] * bool(clothes.get("scarf_colour"))}
    return {side: [tuple(re.findall(r"[a-z0-9]+", v.lower())) for v in vs]
            for side, vs in values.items()}


def attribute_agreement(records, descriptions):
    """Share of true attribute values that the right text names and the other text does not
    (unless it is also a true value there: black hair and black boots), per side, over the
    SynthPEDES records; an image without a description scores 0. Returns {"identity": float,
    "clothing": float, "images": int, "described": int}."""
    hits, counts = {"identity": 0, "clothing": 0}, {"identity": 0, "clothing": 0}
    images = described = 0
    for record in records:
        if "attributes" not in record:
            continue
        text = descriptions.get(record["file_path"], {"identity": "", "clothing": ""})
        images += 1
        described += record["file_path"] in descriptions
        truth = _truth(record["attributes"])
        words = {side: set(re.findall(r"[a-z0-9]+", text[side].lower())) for side in truth}
        for side, other in (("identity", "clothing"), ("clothing", "identity")):
            other_truth = {w for value in truth[other] for w in value}
            for value in truth[side]:
                named = all(w in words[side] for w in value)
                leaked = all(w in words[other] and w not in other_truth for w in value)
                hits[side] += named and not leaked
                counts[side] += 1
    scores = {side: hits[side] / max(1, counts[side]) for side in hits}
    return scores | {"images": images, "described": described}


def print_agreement(records, descriptions):
    score = attribute_agreement(records, descriptions)
    print(f"agreement with the SynthPEDES attributes over {score['images']} images "
          f"({score['described']} described): identity "
          f"{score['identity']:.3f}, clothing {score['clothing']:.3f} (share of true values named "
          "in the right text and not leaked into the other)")


# ----------------------------------------------------------------------------------------------
# Command line: generate, summarise, draw a contact sheet, benchmark.

def style_counts(ann: Annotations) -> str:
    """Captions per annotator style, from the records' "caption_styles" (planted 0-4, realistic 5-8)."""
    styles = Counter(s for r in ann.records for s in r.get("caption_styles", []))
    return "\n".join(f"captions in style {s} ({STYLE_NAMES[s]}): {styles[s]}" for s in sorted(styles))


def contact_sheet(ann: Annotations, path: Path, columns=6, rows=4, zoom=3) -> Path:
    """A PNG grid of training images (the outfits of a few identities), each with its identity
    and clothing descriptions (or its first caption when there are none)."""
    recs = [r for r in ann.records if r["split"] == "train"]
    by_outfit = {}
    for r in recs:
        by_outfit.setdefault((r["id"], r.get("outfit", 0)), r)  # one image per outfit
    picked = list(by_outfit.values())[:columns * rows]
    first = load_image(ann.image_dir / picked[0]["file_path"])
    w, h = first.width * zoom, first.height * zoom
    font = ImageFont.load_default()
    chars = max(12, int(w / (ImageDraw.Draw(first).textlength("x" * 10, font=font) / 10)))
    text_h = 11 * 12  # lines x line height of the default font
    sheet = Image.new("RGB", (columns * (w + 8), rows * (h + text_h + 8)), "white")
    draw = ImageDraw.Draw(sheet)
    for n, r in enumerate(picked):
        x, y = (n % columns) * (w + 8), (n // columns) * (h + text_h + 8)
        sheet.paste(load_image(ann.image_dir / r["file_path"]).resize((w, h), Image.Resampling.NEAREST), (x, y))
        text = (f"id {r['id']} outfit {r.get('outfit', 0)}\nID: {r['identity_text']}\nCLOTHES: {r['clothing_text']}"
                if "identity_text" in r else f"id {r['id']}: {r['captions'][0]}")
        wrapped = "\n".join(textwrap.fill(t, chars) for t in text.split("\n"))
        draw.multiline_text((x + 2, y + h + 2), wrapped, fill="black", font=font, spacing=2)
    sheet.save(path)
    return path


def bench(num_ids=100, size=(128, 64)) -> float:
    """Generate a SynthPEDES into a temporary folder; return images per second."""
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        folder = generate_synthpedes(tmp, num_ids=num_ids, image_size=size, progress=False)
        seconds = time.perf_counter() - start
        n = len(list((folder / "imgs").rglob("*.png")))
    return n / seconds


def synth_settings(args) -> SynthConfig | None:
    """The SynthPEDES settings given on the command line (unset ones take the defaults), or None
    when none was given: then an existing dataset is summarised as it is."""
    given = {k: getattr(args, k) for k in ("num_ids", "outfits_per_id", "images_per_outfit",
                                           "image_size", "regime", "seed", "captions",
                                           "train_images_per_outfit")}
    if all(v is None for v in given.values()):
        return None
    try:
        return SynthConfig(**{k: tuple(v) if k == "image_size" else v
                              for k, v in given.items() if v is not None})
    except ValueError as e:
        raise DatasetError(f"bad SynthPEDES settings: {e}") from None


def prepare_synth(args) -> None:
    """Generate SynthPEDES when missing; an existing one is kept unless --overwrite (a command
    that summarises never destroys data), and settings that differ from it are an error."""
    folder, cfg = Path(args.root) / "SynthPEDES", synth_settings(args)
    if cfg is None and (folder / "reid_raw.json").exists():
        print(f"SynthPEDES in {folder} ({saved_synth_config(folder) or 'settings unknown'})")
        return
    cfg = cfg or SynthConfig()
    start = time.perf_counter()
    folder = ensure_synthpedes(args.root, overwrite=args.overwrite, **asdict(cfg))
    print(f"SynthPEDES ready in {folder} ({time.perf_counter() - start:.1f} s; {cfg})")


def main(argv=None):
    defaults = SynthConfig()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", default="data", help="folder that holds the dataset folders (default: data)")
    synth = parser.add_argument_group("SynthPEDES settings (unset: an existing dataset is kept as "
                                      "it is; a new one takes the default shown)")
    synth.add_argument("--num-ids", type=int, help=f"identities (default {defaults.num_ids})")
    synth.add_argument("--outfits-per-id", type=int, help="default: 3 cloth-changing, 1 same-clothes")
    synth.add_argument("--images-per-outfit", type=int, help="default: 2 cloth-changing, 4 same-clothes")
    synth.add_argument("--train-images-per-outfit", type=int,
                       help="photographs of each outfit of a training identity (default: --images-per-outfit)")
    synth.add_argument("--image-size", type=int, nargs=2, metavar=("H", "W"),
                       help=f"default {defaults.image_size[0]} {defaults.image_size[1]}")
    synth.add_argument("--regime", choices=("same-clothes", "cloth-changing"),
                       help=f"default {defaults.regime}")
    synth.add_argument("--seed", type=int, help=f"default {defaults.seed}")
    synth.add_argument("--captions", choices=("planted", "realistic"),
                       help=f"annotator styles (default {defaults.captions})")
    synth.add_argument("--overwrite", action="store_true",
                       help="replace an existing SynthPEDES made with other settings, and its descriptions")
    parser.add_argument("--workers", type=int, default=8, help="threads that decode the images (default: 8)")
    parser.add_argument("--bench", action="store_true", help="print the SynthPEDES generation rate")
    args = parser.parse_args(argv)
    if args.bench:
        size = tuple(args.image_size or defaults.image_size)
        print(f"SynthPEDES generation: {bench(size=size):.0f} images/s at {size[0]}x{size[1]} "
              f"(render + PNG write, one process)")
        return
    prepare_synth(args)
    ann = report("synth", args.root, args.workers)  # as `python data.py --data synth`
    print(style_counts(ann))
    print(f"contact sheet: {contact_sheet(ann, ann.annotation_file.parent / 'contact_sheet.png')}")


if __name__ == "__main__":
    run_command(main)
