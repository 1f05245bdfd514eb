"""Command lines built from config dataclasses: every field a `--field-name value` flag, its
value checked against the field's type, its default shown for each preset."""
from __future__ import annotations

import argparse
import dataclasses


def parse_value(text: str, kind):
    """A command-line string as a field of type `kind` (bool, int, float, str, tuple of ints)."""
    if kind is bool or kind == "bool":
        if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
        return text.lower() in ("true", "1", "yes")
    if kind in (int, "int"):
        return int(text)
    if kind in (float, "float"):
        return float(text)
    if str(kind).startswith("tuple"):
        return tuple(int(v) for v in text.replace("x", ",").split(","))
    return text


def add_config_flags(parser: argparse.ArgumentParser, owner: str, small, full) -> None:
    """One flag per field of the dataclass instances `small` and `full` (the SynthPEDES and the
    paper presets of one config), stored as `owner.field` so that each config reads its own."""
    for f in dataclasses.fields(small):
        a, b = getattr(small, f.name), getattr(full, f.name)
        shown = "synth; choices synth|cuhk|icfg|rstp" if f.name == "data" else (
            a if a == b else f"{a} with --data synth, {b} with cuhk|icfg|rstp")
        parser.add_argument(f"--{f.name.replace('_', '-')}", dest=f"{owner}.{f.name}", metavar=f.name.upper(),
                            default=None,
                            type=lambda s, t=f.type: parse_value(s, t),
                            help=f"{type(small).__name__}.{f.name} (default: {shown})")


def given(args: argparse.Namespace, owner: str) -> dict:
    """The fields of `owner`'s config set on the command line."""
    prefix = owner + "."
    return {k[len(prefix):]: v for k, v in vars(args).items() if k.startswith(prefix) and v is not None}
