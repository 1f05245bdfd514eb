"""The SynthPEDES renderer: one pedestrian photograph from an identity, an outfit and a nuisance.

A pure function of its three dicts (`render_person`), drawn with PIL: a street background, legs
with the stride of a walk, the top garment with its pattern, arms and sleeves, the head (hair
style, glasses, beard, hat), the bag, an occluder, then mirror, brightness and tint. Read top to
bottom: the vocabulary (every value and its colour or size), the body layout in pixels
(`body_layout`, and `body_regions`, where each trait must show so that tests can check the
pixels), the pen, one function per body part, `render_person`.

`synthetic/synthpedes.py` draws the values (identity traits once per person, outfits, nuisance) and
writes the dataset; this file only draws pixels (docs/design.md#synthpedes).

Test: pytest tests/test_data.py -k "region or height or build or gender or hair or glasses"
"""
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

# ----------------------------------------------------------------------------------------------
# Vocabulary: the values a pedestrian can take. Identity traits are fixed per identity (synthetic/synthpedes.py
# draws them once per person); clothing changes per outfit.

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
PLAIN_BACKGROUND = (70, 120, 110)  # used when clutter is off (tests): in no palette above

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
