"""The documentation works: every relative link in README.md and docs/*.md reaches a file (and
its #anchor a heading of that file); every reference to a design note, in the docs and in the
comments and docstrings of every .py, is `docs/<file>.md#<anchor>` or `README.md#<anchor>` and
resolves (docs/design.md#what-the-tests-check); and every `python X.py ...` command the README
shows in a code block names a script that exists and takes the flags shown."""
import ast
import io
import json
import os
import re
import shlex
import subprocess
import sys
import tokenize
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
# References to design notes: one form, `docs/<file>.md#<anchor>` or `README.md#<anchor>` (in a
# markdown link from docs/, relative: `design.md#<anchor>`), and it resolves. Read in every .md
# and in the comments and docstrings of every .py of the project.

PYTHON = sorted([*REPO.glob("*.py"), *(p for d in ("helpers", "synthetic", "tools", "tests")
                                       for p in (REPO / d).rglob("*.py"))])
REFERENCE = re.compile(r"(?<![\w/.-])((?:docs/[\w.-]+|README)\.md)(?:#([\w-]+))?")
ANCHORED_LINK = re.compile(r"!?\[[^\]]*\]\([^)\s]*#[^)\s]*\)")
# The old spellings: the design note that was once outside the repository (by its name, its
# section numbers), a design decision by number, a note by its heading's words; each with its
# name. A decision's number is fine when its anchor follows it.
OLD_SPELLINGS = [
    (re.compile(r"\bdesign(?:\.md)?,?\s+(?:section\s+)?\d+(?:\.\d+)?", re.I), "a design section by number"),
    (re.compile(r"\b(?:design\s+)?decisions?\s+(\d+)", re.I), "a design decision by number"),
    (re.compile(r"\b(?:docs/)?(?:README|design|experiments|claims|benchmarks)(?:\.md)?,\s+"
                r"(?:\"[^\"\n]*\"?|section\s+\d+|[A-Z][\w'-]*)"),
     "a note by its heading's words"),
    (re.compile(r"\bDESIGN\b"), "the design file outside the repository"),
]


def commentary(source: str) -> str:
    """A .py file's comments and docstrings at their places, the code blanked to spaces (the
    lines kept, so a reference wrapped over two comment lines reads as one)."""
    tree = ast.parse(source)
    docstrings = {node.body[0].value.lineno for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr)
                  and isinstance(node.body[0].value, ast.Constant) and isinstance(node.body[0].value.value, str)}
    out = [[" "] * len(line) for line in source.splitlines()]
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        keep = tok.type == tokenize.COMMENT or (tok.type == tokenize.STRING and tok.start[0] in docstrings)
        if keep:
            for row, text in enumerate(tok.string.removeprefix("#").split("\n"), tok.start[0]):
                col = tok.start[1] + (tok.type == tokenize.COMMENT) if row == tok.start[0] else 0
                out[row - 1][col:col + len(text)] = text
    return "\n".join("".join(line) for line in out)


def reference_problems(path: Path, root: Path = REPO) -> list[str]:
    """'file:line: text (why)' for each reference to a note in `path` (a .md, or a .py's comments
    and docstrings) that names a missing file or heading, or that uses an old spelling."""
    text = path.read_text(encoding="utf-8")
    text = commentary(text) if path.suffix == ".py" else text
    name = path.relative_to(root)
    where = lambda m: f"{name}:{text.count(chr(10), 0, m.start()) + 1}: {' '.join(m.group(0).split())}"
    bad = []  # (start, end, problem)
    for m in REFERENCE.finditer(text):
        file, anchor = root / m.group(1), m.group(2)
        if not file.is_file():
            bad.append((m.start(), m.end(), f"{where(m)} (no such file)"))
        elif anchor and anchor not in anchors(file):
            bad.append((m.start(), m.end(), f"{where(m)} (no heading #{anchor})"))
    # In markdown, a link with an #anchor is the reference itself, whatever its text says.
    plain = ANCHORED_LINK.sub(lambda m: " " * len(m.group(0)), text) if path.suffix == ".md" else text
    for pattern, why in OLD_SPELLINGS:
        for m in pattern.finditer(plain):
            cited = m.lastindex and re.search(rf"design\.md#{m.group(1)}-", text[m.end():m.end() + 100])
            if not cited and not any(s < m.end() and m.start() < e for s, e, _ in bad):
                bad.append((m.start(), m.end(), f"{where(m)} ({why}: cite docs/<file>.md#<anchor>)"))
    return [problem for _, _, problem in sorted(bad)]


def test_a_reference_that_resolves_passes(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "design.md").write_text("# Design\n\n### 3. GradNorm, as Eq. 5-6 write it\n")
    code = tmp_path / "a.py"
    code.write_text('"""The weights (docs/design.md#3-gradnorm-as-eq-5-6-write-it)."""\n'
                    "x = 1  # see docs/design.md, and design decision 3 (docs/design.md#3-gradnorm-as-eq-5-6-write-it)\n")
    assert reference_problems(code, tmp_path) == []


def test_a_missing_file_or_heading_is_found(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "design.md").write_text("## SynthPEDES\n")
    (tmp_path / "README.md").write_text("[ok](docs/design.md#synthpedes) `docs/design.md#synth` "
                                        "docs/gone.md#x README.md#results\n")
    assert reference_problems(tmp_path / "README.md", tmp_path) == [
        "README.md:1: docs/design.md#synth (no heading #synth)",
        "README.md:1: docs/gone.md#x (no such file)",
        "README.md:1: README.md#results (no heading #results)"]


def test_old_spellings_are_found(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "experiments.md").write_text("## Four times the steps\n")
    code = tmp_path / "a.py"
    code.write_text('"""Stage 1 (DESIGN.md section 3.1)."""\n'
                    "s = 'DESIGN 3.1 in a string: code, not a comment'\n"
                    "# glasses are identity (README, design\n#   decision 11); DESIGN 7\n"
                    "# the cached texts (docs/experiments.md, \"Four times the steps\"), a design decision\n")
    assert reference_problems(code, tmp_path) == [
        "a.py:1: DESIGN.md section 3.1 (a design section by number: cite docs/<file>.md#<anchor>)",
        "a.py:3: design decision 11 (a design decision by number: cite docs/<file>.md#<anchor>)",
        "a.py:4: DESIGN 7 (a design section by number: cite docs/<file>.md#<anchor>)",
        'a.py:5: docs/experiments.md, "Four times the steps" '
        "(a note by its heading's words: cite docs/<file>.md#<anchor>)"]


def test_a_link_names_a_decision_by_number_in_its_text(tmp_path):
    (tmp_path / "docs").mkdir()
    page = tmp_path / "docs" / "claims.md"
    page.write_text("[design decisions 3](design.md#3-g) and [5](design.md#5-t) hold;\n"
                    "decision 9 does not; the twelve design decisions, a design decision.\n\n### 9. Small\n")
    assert reference_problems(page, tmp_path) == [
        "docs/claims.md:2: decision 9 (a design decision by number: cite docs/<file>.md#<anchor>)"]


@pytest.mark.parametrize("path", DOCS + PYTHON, ids=lambda p: str(p.relative_to(REPO)))
def test_references_to_notes_use_one_form_and_resolve(path):
    assert not reference_problems(path), "\n".join(reference_problems(path))


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
