"""The documentation works: every relative link in README.md and docs/*.md reaches a file (and
its #anchor a heading of that file), and every `python X.py ...` command the README shows in a
code block names a script that exists and takes the flags shown."""
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"^ {0,3}(```|~~~)")


def code_and_prose(text: str) -> tuple[list[str], list[str]]:
    """Split markdown into code lines (fenced blocks, and indented blocks after a blank line)
    and prose lines (everything else, with inline `code` spans removed)."""
    code, prose, fenced, indented, previous = [], [], False, False, ""
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
        elif fenced:
            code.append(line)
        elif line.startswith("    ") and (indented or not previous.strip()):
            indented = True
            code.append(line)
        else:
            indented = indented and not line.strip()  # a blank line inside an indented block
            prose.append(re.sub(r"`[^`]*`", "", line))
        previous = line
    return code, prose


# ----------------------------------------------------------------------------------------------
# Links: [text](target) and ![alt](target); anchors use GitHub's heading slugs.

LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^ {0,3}#{1,6}\s+(.*?)(?:\s+#+)?\s*$")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: its text (links reduced to their text) lower-cased, every
    character but letters, digits, '_', '-' and spaces dropped, each space a hyphen."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """The anchors of a markdown file's headings; a repeated slug gets -1, -2, ... (GitHub)."""
    seen, out = {}, set()
    for line in code_and_prose(path.read_text(encoding="utf-8"))[1]:
        if m := HEADING.match(line):
            base = slug(m.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            out.add(base if n == 0 else f"{base}-{n}")
    return out


def ignored_by_git(where: Path) -> bool:
    """Whether git would leave this file out of a commit (so a clone would not have it): False
    outside a git work tree or without git."""
    try:
        return subprocess.run(["git", "check-ignore", "-q", str(where)], cwd=where.parent,
                              capture_output=True).returncode == 0
    except OSError:
        return False


def broken_links(path: Path, root: Path = REPO) -> list[str]:
    """'file: target (why)' for each relative link of a markdown file that does not resolve,
    in this tree or in a clone of it (file named relative to `root`)."""
    bad = []
    for line in code_and_prose(path.read_text(encoding="utf-8"))[1]:
        for target in LINK.findall(line):
            if re.match(r"(https?|mailto):", target):
                continue
            file, _, anchor = target.partition("#")
            where = (path.parent / file).resolve() if file else path
            if not where.exists():
                bad.append(f"{path.relative_to(root)}: {target} (no such file)")
            elif ignored_by_git(where):
                bad.append(f"{path.relative_to(root)}: {target} (ignored by git: not in a clone)")
            elif anchor and where.suffix == ".md" and anchor not in anchors(where):
                bad.append(f"{path.relative_to(root)}: {target} (no heading #{anchor})")
    return bad


def test_slug_follows_github_on_hand_worked_headings():
    assert slug("1. Honest retrieval: retrieve, then re-rank") == "1-honest-retrieval-retrieve-then-re-rank"
    assert slug("`mamba_triton.py` --bench (GPU), [see](x.md)") == "mamba_tritonpy---bench-gpu-see"


def test_repeated_headings_get_numbered_anchors(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Setup\n\n## Setup\n\n    # not a heading: code\n\n### Setup!\n")
    assert anchors(page) == {"setup", "setup-1", "setup-2"}


def test_broken_links_are_found(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "b.md").write_text("## Two words\n")
    page = tmp_path / "a.md"
    page.write_text("[ok](docs/b.md#two-words) [gone](docs/c.md) [anchor](docs/b.md#three) "
                    "[self](#top) [web](https://example.org/x.md#y) `[code](nowhere.md)`\n\n# Top\n")
    assert broken_links(page, tmp_path) == ["a.md: docs/c.md (no such file)",
                                            "a.md: docs/b.md#three (no heading #three)"]


def test_a_link_to_a_file_git_ignores_is_broken(tmp_path):
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    (tmp_path / ".gitignore").write_text("*.png\n")
    (tmp_path / "plot.png").write_bytes(b"")
    page = tmp_path / "a.md"
    page.write_text("![plot](plot.png)\n")
    assert broken_links(page, tmp_path) == ["a.md: plot.png (ignored by git: not in a clone)"]


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_every_relative_link_resolves(path):
    assert not broken_links(path)


# ----------------------------------------------------------------------------------------------
# Commands: each `python X.py ...` line of the README's code blocks (after `$ ` and any VAR=value).

def readme_commands() -> dict[str, list[list[str]]]:
    """script -> the distinct argument lists the README shows it with, in order."""
    out = {}
    for line in code_and_prose((REPO / "README.md").read_text(encoding="utf-8"))[0]:
        words = shlex.split(line.strip().removeprefix("$ "), comments=True)
        while words and re.fullmatch(r"\w+=\S*", words[0]):
            words.pop(0)
        if len(words) >= 3 and words[:2] == ["python", "-m"]:  # python -m tools.study: tools/study.py
            words = ["python", words[2].replace(".", "/") + ".py", *words[3:]]
        if len(words) >= 2 and words[0] == "python" and words[1].endswith(".py"):
            args = out.setdefault(words[1], [])
            if words[2:] not in args:
                args.append(words[2:])
    return out


COMMANDS = readme_commands()
# Run in a fresh interpreter: the script's module is imported and, when it reads a command line
# (the project's `main(argv)`), called once per README command with `--help` appended (before a
# `--` that passes the rest on). argparse checks the values of the flags before --help (choices,
# types), then prints the help and exits 0; a flag it does not know is caught by looking for it
# in that help. A script without main(argv) is not run: it would ignore `--help` and do its work.
DRIVER = """
import contextlib, importlib, inspect, io, json, sys
module = importlib.import_module(sys.argv[1])
main = getattr(module, "main", None)
if main is None or not inspect.signature(main).parameters:
    print(json.dumps(None))
    sys.exit(0)
results = []
for args in json.loads(sys.argv[2]):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            cut = args.index("--") if "--" in args else len(args)
            main(args[:cut] + ["--help"] + args[cut:])
            status = "returned without printing its help"
        except SystemExit as e:
            status = e.code or 0
    results.append({"args": args, "status": status, "help": out.getvalue(), "stderr": err.getvalue()})
print(json.dumps(results))
"""


def flags(args: list[str]) -> list[str]:
    """The --flags of an argument list, up to a `--` (--flag=value counts as --flag)."""
    args = args[:args.index("--")] if "--" in args else args
    return [a.split("=")[0] for a in args if a.startswith("--")]


def test_flags_stop_at_a_double_dash():
    assert flags(["--data", "cuhk", "--p=32", "--bench", "--", "--seed", "1"]) == ["--data", "--p", "--bench"]


def test_the_readme_shows_commands():
    assert "train.py" in COMMANDS, "no `python train.py` found in README.md's code blocks"


@pytest.mark.parametrize("script", sorted(COMMANDS))
def test_readme_command_parses(script):
    assert (REPO / script).is_file(), f"README.md shows `python {script}` (or its -m form): no such file"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", DRIVER, script.removesuffix(".py").replace("/", "."), json.dumps(COMMANDS[script])],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, f"{script} does not import:\n{run.stderr[-3000:]}"
    results = json.loads(run.stdout.splitlines()[-1])
    failures = []
    if results is None:  # no command line: only a bare `python X.py` is right
        failures += [f"python {script} {shlex.join(args)}: {script} takes no arguments"
                     for args in COMMANDS[script] if args]
    for r in results or []:
        shown = f"python {script} {shlex.join(r['args'])}".strip()
        if r["status"] != 0:
            failures.append(f"{shown}: exit status {r['status']} {r['stderr'].strip()[-500:]}")
        failures += [f"{shown}: {flag} is not in `python {script} --help`" for flag in flags(r["args"])
                     if not re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", r["help"])]
    assert not failures, "\n".join(failures)
