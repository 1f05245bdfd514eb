"""Do the paper's claims hold? The ablation study of Tables II-V and Fig. 5 on SynthPEDES.

SynthPEDES knows who is who and what they wear, so each claim of the paper can be tested under
control: every row of the claims below is trained with seeds 0, 1, 2 in both regimes
(cloth-changing and same-clothes) by `train.py`, evaluated on the 90 held-out test identities, and
compared with the full model by one rule (`verdict`), on the numbers each claim is about
(`Claim.reads`): a claim about decoupling (Tables II and V) on the mAP over the person's other
outfits and Table V's ratios, the others on Rank-1 and mAP. Each finished run leaves a small JSON
summary in results/study/runs/; a study that is stopped continues from them (an interrupted run
resumes from its last.pt). The table is written to results/study/table.{md,json}, with one picture
per regime (effects-<regime>.png: each row's effect, sorted, against the claim).

    python -m tools.study                         # everything; prints the time it expects first
    python -m tools.study --table                 # only rebuild the table and pictures from the finished runs
    python -m tools.study --hours 2               # the rows that fit in two hours, in the claims' order
    python -m tools.study --rows full "w/o BDAM" --seeds 0 --regimes same-clothes
    python -m tools.study --rows full -- --max-steps 20    # flags after -- go to every train.py run
    python -m tools.study --rows full "w/o Mamba" --out results/study-4-epochs -- --epochs 4   # a longer study

Tests: pytest tests/test_study.py
"""
import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from helpers.reports import robustness_ratios
from train import ABLATIONS, parse_config

HERE = Path(__file__).resolve().parent.parent  # the repository root, where train.py is
RESULTS = HERE / "results" / "study"
REGIMES = ("cloth-changing", "same-clothes")
SEEDS = (0, 1, 2)
MIN_SEEDS = 3  # no verdict on fewer: the paper reports the mean over seeds 0, 1, 2 (issue 23)
STUDY_PRESET = {}  # train.py fields on top of its SynthPEDES preset: none, its default run length
MINUTES_PER_RUN = 7.5  # the time estimate before any run has finished (a default run on this machine)

SETTINGS = ("Standard", "Identity-Only", "Clothes-Conflict")  # Table V
# What a verdict reads, per stage: Rank-1 / mAP over all images, over other outfits, Table V's ratios
METRICS = {"R1": "Rank-1", "mAP": "mAP", "cross_R1": "Rank-1, other outfits", "cross_mAP": "mAP, other outfits",
           "Identity-Only": "Identity-Only / Standard", "Clothes-Conflict": "Clothes-Conflict / Standard"}
CROSS = ("cross_R1", "cross_mAP")  # absent from the summaries written before issue 23
ALL_IMAGES = ("R1", "mAP")
DECOUPLING = ("cross_mAP", "Identity-Only", "Clothes-Conflict")  # the decoupled model finds the person, not the clothes
NOT_TESTABLE = "not testable at this length"
# What would test the fusion's rows where its stage 2 is within noise of its stage 1 (four times the steps)
LONGER = ("a 4-epoch run of the full model and of `w/o Mamba`, seeds 0-2, would test them: "
          "`python -m tools.study --rows full \"w/o Mamba\" --regimes {regime} --out results/study-4-epochs -- --epochs 4`")


@dataclass(frozen=True)
class Claim:
    text: str
    source: str  # where the paper makes it
    rows: tuple  # rows of train.ABLATIONS, each compared with "full"
    reads: tuple = ALL_IMAGES  # the METRICS its verdict is read from, on the final ranking
    needs_fusion: bool = False  # it can show only where the full model's fusion changes the ranking


ROBUSTNESS_ROWS = ("full", "w/o BDAM", "w/o L_decouple", "w/o L_aln")  # Table V
CLAIMS = (  # in the order the study runs them
    Claim("BDAM helps; its cross-attention and its gate each help", "Table II",
          ("w/o BDAM", "w/o cross-attention", "w/o BDAM gate", "shallow BDAM"), DECOUPLING),
    Claim("the fusion helps; Mamba beats an MLP of the same depth; its gate and alignment help",
          "Table III", ("w/o fusion", "w/o Mamba", "w/o fusion gate", "w/o alignment"), needs_fusion=True),
    Claim("each loss helps; GradNorm beats fixed weights", "Table IV",
          ("w/o L_aln", "w/o L_decouple", "w/o L_info", "w/o L_tri", "w/o GradNorm", "w/o weight regulariser")),
    Claim("the decoupled model keeps its accuracy when the clothing text is wrong", "Table V",
          ROBUSTNESS_ROWS[1:], DECOUPLING),
)
ALL_ROWS = tuple(dict.fromkeys(("full",) + tuple(row for claim in CLAIMS for row in claim.rows)))


def slug(row: str) -> str:
    """A row name as a folder name: "w/o BDAM gate" -> "wo-BDAM-gate"."""
    return row.replace("w/o ", "wo-").replace(" ", "-")


# ----------------------------------------------------------------------------------------------
# Running: one train.py process per (regime, row, seed); its summary is all the study keeps

def table_v_ratios(robustness: dict) -> dict:
    """{setting: {stage: ratio}}: the Rank-1 of Identity-Only and Clothes-Conflict queries over
    Standard's, per stage (helpers.reports.robustness_ratios); {} for a run without Table V."""
    out = {}
    for (name, stage), ratio in (robustness_ratios(robustness) if robustness else {}).items():
        out.setdefault(name, {})[stage] = ratio
    return out


def summarise(results: dict, row: str, regime: str, seed: int, minutes: float) -> dict:
    """The part of a run's results.json that the table needs. Per stage (stage 2 is None without
    fusion): Rank-1 and mAP over all the person's images and over their other outfits only
    (cross_R1, cross_mAP: None where no query's person has another outfit, as in the same-clothes
    regime); the same for each Table V setting and Table V's ratios, in both protocols (as shipped,
    whole text); the retrieval settings chosen on validation (beta, K, a); the gates (Fig. 5)."""
    def pick(m):
        other = (m or {}).get("cross_outfit") or {}
        return None if m is None else {"R1": m["R1"], "mAP": m["mAP"], "cross_R1": other.get("R1"),
                                       "cross_mAP": other.get("mAP")}
    stages = lambda r: {"stage1": pick(r["stage1"]), "stage2": pick(r["stage2"])}  # noqa: E731
    shipped = results.get("table_v_as_shipped", results.get("robustness"))  # the key before 2026-12-07
    robustness = {name: stages(r) for name, r in (shipped or {}).items()}
    whole = {name: stages(r) for name, r in (results.get("table_v_whole_text") or {}).items()}
    gates = results.get("gates") or {}
    bdam, fusion = gates.get("bdam"), gates.get("fusion")
    return {"row": row, "regime": regime, "seed": seed, "minutes": round(minutes, 2), **stages(results),
            "robustness": robustness, "ratios": table_v_ratios(robustness),
            "robustness_whole_text": whole, "ratios_whole_text": table_v_ratios(whole),
            "retrieval": {key: results.get(key) for key in ("clothing_weight", "rerank_k", "fusion_weight")},
            "gates": {"bdam_mean": bdam and bdam["mean"], "bdam_channel_std": bdam and bdam.get("channel_std"),
                      "fusion_w_img": fusion and fusion["mean"]}}


def summary_path(out: Path, regime: str, row: str, seed: int) -> Path:
    return out / "runs" / regime / slug(row) / f"seed{seed}.json"


def train_command(regime: str, row: str, seed: int, extra: list, out: Path = RESULTS) -> tuple[list, Path]:
    """The train.py command of one run (a resume when it was interrupted) and its run folder,
    runs/<out's name>/...: a study written elsewhere (--out results/study-4-epochs) trains its own."""
    name = f"{out.name}/{regime}/{slug(row)}/seed{seed}"
    run = Path("runs") / name
    if (run / "last.pt").exists():
        return [sys.executable, str(HERE / "train.py"), "--resume", str(run)], run
    flags = {"data": "synth", "seed": str(seed), "synth-regime": regime, "name": name,
             "root": f"data/study-{regime}", **STUDY_PRESET}
    args = [arg for field, value in flags.items() for arg in (f"--{field.replace('_', '-')}", value)]
    return [sys.executable, str(HERE / "train.py"), "--ablation", row, *args, *extra], run


def run_one(regime: str, row: str, seed: int, out: Path, extra: list) -> dict:
    """Train and evaluate one run (its output goes to <run>.log); write and return its summary."""
    command, run = train_command(regime, row, seed, extra, out)
    run.parent.mkdir(parents=True, exist_ok=True)
    start = time.time()
    if not (run / "results.json").exists():
        with open(run.with_suffix(".log"), "a") as log:
            child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
            try:
                code = child.wait()
            except KeyboardInterrupt:  # Ctrl-C reaches train.py too: let it save last.pt and exit
                child.wait()
                raise
        if code != 0:
            raise RuntimeError(f"{' '.join(command)} failed (exit {code}); its output is in "
                               f"{run.with_suffix('.log')}. Rerun tools/study.py to continue from there.")
    results = json.loads((run / "results.json").read_text())
    summary = summarise(results, row, regime, seed, (time.time() - start) / 60)
    path = summary_path(out, regime, row, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def epochs_asked(extra: list) -> int:
    """The epochs a run trains for, as train.py reads the flags after `--` (the SynthPEDES
    preset's one without `--epochs`): what the time of a run scales with before any is timed."""
    return parse_config(["--data", "synth", *extra])[0].train.epochs


def run_study(rows, seeds, regimes, out: Path, extra: list, hours: float | None = None) -> None:
    """Every (row, regime, seed) without a summary, one after another, a line per run; rows come
    first so that a study cut short by `hours` leaves whole rows out, the last ones."""
    plan = [(regime, row, seed) for row in rows for regime in regimes for seed in seeds]
    todo = [p for p in plan if not summary_path(out, *p).exists()]
    done = [json.loads(summary_path(out, *p).read_text()) for p in plan if p not in todo]
    epochs = epochs_asked(extra)
    per_run = statistics.median(s["minutes"] for s in done) if done else MINUTES_PER_RUN * epochs
    print(f"study: {len(plan)} runs, {len(done)} finished (kept in {out / 'runs'}), {len(todo)} to do; "
          f"expected {len(todo) * per_run / 60:.1f} h of CPU time at {per_run:.1f} min per run "
          f"({'median of the finished runs' if done else f'measured on the README machine, x {epochs} epochs'})",
          flush=True)
    begin = time.time()
    for i, (regime, row, seed) in enumerate(todo, 1):
        spent = (time.time() - begin) / 60
        if hours is not None and spent + per_run > 60 * hours:
            left = sorted({r for _, r, _ in todo[i - 1:]}, key=rows.index)
            print(f"study: stopped after {spent:.0f} min (--hours {hours}); not run: {len(todo) - i + 1} runs "
                  f"of {', '.join(left)}", flush=True)
            return
        s = run_one(regime, row, seed, out, extra)
        per_run = (time.time() - begin) / 60 / i
        final = s["stage2"] or s["stage1"]
        print(f"[{i}/{len(todo)}] {regime} | {row} | seed {seed}: {s['minutes']:.1f} min, final Rank-1 "
              f"{final['R1']:.1f} mAP {final['mAP']:.1f}; about {per_run * (len(todo) - i):.0f} min left",
              flush=True)


# ----------------------------------------------------------------------------------------------
# The table: mean +- std over seeds, the difference from the full model, and a verdict

def final(summary: dict) -> dict:
    """The ranking a user gets: stage 2 where the model has a fusion, else stage 1."""
    return summary["stage2"] or summary["stage1"]


def ratios(summary: dict) -> dict:
    """Table V's ratios of a run; a summary written before they were kept has them from its Rank-1s."""
    return summary["ratios"] if "ratios" in summary else table_v_ratios(summary["robustness"])


def value(summary: dict, stage: str, metric: str):
    """One of a run's METRICS at "stage1", "stage2" or "final" (stage 2 where the model has a
    fusion); None where the run has no such stage or number, or its summary predates it."""
    stage = ("stage2" if summary["stage2"] else "stage1") if stage == "final" else stage
    if metric in SETTINGS:
        return ratios(summary).get(metric, {}).get(stage)
    return (summary[stage] or {}).get(metric)


def predates(summary: dict) -> bool:
    """Whether a summary was written before the numbers over other outfits were kept (issue 23)."""
    return CROSS[-1] not in summary["stage1"]


def mean_std(values: list) -> tuple:
    """(mean, sample standard deviation); the deviation is None for fewer than two values."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def pooled_std(a: list, b: list) -> float:
    """s = sqrt((s_a^2 + s_b^2) / 2), from the sample standard deviations over seeds."""
    return ((statistics.stdev(a) ** 2 + statistics.stdev(b) ** 2) / 2) ** 0.5


def verdict(full: list, ablated: list) -> str:
    """The claim "the full model beats the ablated row" on one metric, over seeds: with
    d = mean(full) - mean(ablated) and the pooled standard deviation s = sqrt((s_full^2 +
    s_ablated^2) / 2), it *holds* when d > 2 s, is *contradicted* when d < -2 s, and is
    *within noise* otherwise. Fewer than MIN_SEEDS (three) seeds on either side: *too few seeds*."""
    if len(full) < MIN_SEEDS or len(ablated) < MIN_SEEDS:
        return "too few seeds"
    d, s = statistics.fmean(full) - statistics.fmean(ablated), pooled_std(full, ablated)
    return "holds" if d > 2 * s else "contradicted" if d < -2 * s else "within noise"


def combine(verdicts: list) -> str:
    """One verdict from those of several metrics: *too few seeds* if any is; *mixed* when one
    holds and another is contradicted; else *holds* or *contradicted* when one metric says so;
    *within noise* when all are."""
    if "too few seeds" in verdicts:
        return "too few seeds"
    if "holds" in verdicts and "contradicted" in verdicts:
        return "mixed"
    return "holds" if "holds" in verdicts else "contradicted" if "contradicted" in verdicts else "within noise"


def compare(full: list, ablated: list, read) -> dict | None:
    """One number (`read`: summary -> number) of a row's runs against the full model's: the row's
    mean, std and values, the difference of means (row minus full), the verdict's noise band 2 s
    (None under two seeds) and the verdict. None where a run lacks the number."""
    f, a = [read(s) for s in full], [read(s) for s in ablated]
    if not f or not a or None in f + a:
        return None
    mean, std = mean_std(a)
    noise = 2 * pooled_std(f, a) if len(f) > 1 and len(a) > 1 else None
    return {"mean": mean, "std": std, "values": a, "diff": mean - statistics.fmean(f), "noise": noise,
            "verdict": verdict(f, a)}


def fusion_test(full: list) -> dict:
    """Whether Table III's claims can show at this length: the full model's stage 2 against its
    stage 1 (verdict(stage 2, stage 1)) on Rank-1, mAP and mAP over other outfits where known.
    Within noise on every one: *not testable at this length* (a row without the fusion cannot
    lose what the fusion does not add); else *testable*, or *too few seeds*."""
    metrics = {}
    for m in ("R1", "mAP", "cross_mAP"):
        s2, s1 = [value(s, "stage2", m) for s in full], [value(s, "stage1", m) for s in full]
        if full and None not in s1 + s2:
            metrics[m] = {"diff": statistics.fmean(s2) - statistics.fmean(s1), "verdict": verdict(s2, s1)}
    found = [c["verdict"] for c in metrics.values()]
    status = ("-" if not found else "too few seeds" if "too few seeds" in found
              else NOT_TESTABLE if set(found) == {"within noise"} else "testable")
    return {"status": status, "metrics": metrics}


def claim_verdict(claim: Claim, cell: dict, fusion: dict) -> dict:
    """One claim's verdict on one row, combined from the verdicts of the metrics it reads (each in
    "from"): *not testable at this length* for a claim about the fusion where fusion_test says so;
    '-' where the summaries lack its numbers or predate those over other outfits (why: "note")."""
    if claim.needs_fusion and fusion["status"] == NOT_TESTABLE:
        return {"verdict": NOT_TESTABLE, "from": {}, "note": "the full model's stage 2 is within noise of its stage 1"}
    if cell["predates"] and set(claim.reads) & set(CROSS):
        return {"verdict": "-", "from": {}, "note": "these summaries predate the numbers over other outfits"}
    read = {m: cell[f"final_{m}"]["verdict"] for m in claim.reads if cell[f"final_{m}"]}
    if not read:
        return {"verdict": "-", "from": {}, "note": "none of its numbers in these summaries"}
    return {"verdict": combine(list(read.values())), "from": read}


def row_cell(row: str, full: list, runs: list, fusion: dict) -> dict:
    """A row of one regime: each metric's mean and std per stage, each against the full model on
    the final ranking ("final_<metric>", compare), and the verdict of each claim it is in."""
    cell = {"row": row, "seeds": len(runs), "predates": any(predates(s) for s in runs + full)}
    for stage in ("stage1", "stage2"):
        for m in METRICS:
            values = [value(s, stage, m) for s in runs]
            cell[f"{stage}_{m}"] = mean_std(values) if None not in values else None
    for m in METRICS:
        cell[f"final_{m}"] = compare(full, runs, lambda s, m=m: value(s, "final", m))
    if row != "full":
        cell["verdicts"] = {c.source: claim_verdict(c, cell, fusion) for c in CLAIMS if row in c.rows}
    return cell


def aggregate(summaries: list) -> dict:
    """Per regime: whether the fusion changes the full model's ranking (fusion_test), each row
    against the full model (row_cell), Table V's settings for ROBUSTNESS_ROWS (the final mAP of
    each), and the full model's gates (Fig. 5)."""
    table = {}
    for regime in REGIMES:
        of = {row: [s for s in summaries if s["regime"] == regime and s["row"] == row] for row in ALL_ROWS}
        full = of["full"]
        if not full:
            continue
        fusion = fusion_test(full)
        rows = [row_cell(row, full, of[row], fusion) for row in ALL_ROWS if of[row]]
        robustness = [{"row": row, **{name: compare(full, of[row], lambda s, n=name: final(s["robustness"][n])["mAP"])
                                      for name in SETTINGS}}
                      for row in ROBUSTNESS_ROWS if of[row] and all(s["robustness"] for s in of[row] + full)]
        gates = {key: mean_std([s["gates"][key] for s in full]) for key in ("bdam_mean", "bdam_channel_std",
                                                                             "fusion_w_img")
                 if all(s["gates"][key] is not None for s in full)}
        table[regime] = {"fusion": fusion, "rows": rows, "robustness": robustness, "gates": gates}
    return table


# ----------------------------------------------------------------------------------------------
# The table as markdown, and one picture per regime

def _pm(value, scale: float = 1.0, digits: int = 1, unit: str = "") -> str:
    """(mean, std) as "mean ± std" (times `scale`); '-' for None."""
    if value is None:
        return "-"
    mean, std = value
    return f"{scale * mean:.{digits}f}" + (f" ± {scale * std:.{digits}f}" if std is not None else "") + unit


def _stages(cell: dict, metric: str, **fmt) -> str:
    """Stage 1 / stage 2 of one metric, each mean ± std."""
    return " / ".join(_pm(cell[f"{stage}_{metric}"], **fmt) for stage in ("stage1", "stage2"))


def _verdicts(cell: dict) -> tuple[str, str]:
    """(each claim's verdict, the metrics' verdicts it was read from) as two table cells."""
    if cell["row"] == "full":
        return "(reference)", ""
    said, why = [], []
    for source, v in cell["verdicts"].items():
        said.append(f"{source}: {v['verdict']}")
        read = ", ".join(f"{METRICS[m]} {answer}" for m, answer in v["from"].items())
        why.append(f"{source}: {read or v['note']}")
    return "; ".join(said), "; ".join(why)


def _fusion_line(regime: str, fusion: dict) -> str:
    """What fusion_test found, in a sentence, and what would test Table III where it cannot."""
    shown = ", ".join(f"{METRICS[m]} {c['diff']:+.1f} ({c['verdict']})" for m, c in fusion["metrics"].items())
    said = {NOT_TESTABLE: f"each within noise: Table III's rows are **{NOT_TESTABLE}**; "
                          + LONGER.format(regime=regime) + ".",
            "testable": "Table III's rows are testable at this length.",
            "too few seeds": f"too few seeds ({MIN_SEEDS} needed) to say whether Table III's rows can show."}
    return f"The fusion, the full model's stage 2 minus stage 1: {shown or '-'}; " + said.get(fusion["status"], "-")


def _all_images(rows: list) -> list:
    out = ["Over all the person's images:", "",
           "| row | seeds | stage-1 R1 | stage-1 mAP | stage-2 R1 | stage-2 mAP | Δ R1 (final) | Δ mAP (final) |",
           "|---" * 8 + "|"]
    for c in rows:
        out.append(f"| {c['row']} | {c['seeds']} | " + " | ".join(_pm(c[k]) for k in (
            "stage1_R1", "stage1_mAP", "stage2_R1", "stage2_mAP")) +
            f" | {c['final_R1']['diff']:+.1f} | {c['final_mAP']['diff']:+.1f} |")
    return out


def _decoupling(rows: list) -> list:
    out = ["Over the person's other outfits only, Table V's ratios (the Rank-1 kept of Standard's), "
           "and each claim's verdict:", "",
           "| row | R1 other outfits (stage 1 / 2) | mAP other outfits (stage 1 / 2) | Identity-Only / Standard "
           "(1 / 2) | Clothes-Conflict / Standard (1 / 2) | Δ mAP other outfits (final) | verdict | read from |",
           "|---" * 8 + "|"]
    for c in rows:
        diff = c["final_cross_mAP"]
        out.append(f"| {c['row']} | {_stages(c, 'cross_R1')} | {_stages(c, 'cross_mAP')} | "
                   f"{_stages(c, 'Identity-Only', scale=100, digits=0, unit='%')} | "
                   f"{_stages(c, 'Clothes-Conflict', scale=100, digits=0, unit='%')} | "
                   + (f"{diff['diff']:+.1f}" if diff else "-") + " | " + " | ".join(_verdicts(c)) + " |")
    return out


def _table_v(robustness: list, verdicts: dict) -> list:
    out = ["", "Table V, final mAP of queries built from the generated descriptions:", "",
           "| row | " + " | ".join(SETTINGS) + " | Δ Clothes-Conflict | verdict (Table V) |", "|---" * 6 + "|"]
    for c in robustness:
        said = "(reference)" if c["row"] == "full" else verdicts[c["row"]].get("Table V", {}).get("verdict", "-")
        out.append(f"| {c['row']} | " + " | ".join(_pm((c[n]["mean"], c[n]["std"])) for n in SETTINGS)
                   + f" | {c['Clothes-Conflict']['diff']:+.1f} | {said} |")
    return out


def markdown(table: dict) -> str:
    """The table as markdown: one section per regime (the fusion, the rows over all images and
    over other outfits with the verdicts, Table V, Fig. 5, the picture)."""
    out = [f"Final: stage 2, or stage 1 without a fusion; Δ: row minus full; verdicts by `study.verdict` "
           f"({MIN_SEEDS} seeds, 2 pooled standard deviations); '-': not in these summaries.", ""]
    for regime, t in table.items():
        out += [f"### {regime}", "", _fusion_line(regime, t["fusion"]), ""]
        out += _all_images(t["rows"]) + [""] + _decoupling(t["rows"])
        if t["robustness"]:
            out += _table_v(t["robustness"], {c["row"]: c.get("verdicts", {}) for c in t["rows"]})
        if t["gates"]:
            g = t["gates"]
            out += ["", "Fig. 5, the full model: " + "; ".join(
                f"{name} {g[key][0]:.3f}" + (f" ± {g[key][1]:.3f}" if g[key][1] is not None else "")
                for key, name in (("bdam_mean", "BDAM gate g (identity share) mean"),
                                  ("bdam_channel_std", "its per-channel std over images"),
                                  ("fusion_w_img", "fusion W_img mean")) if key in g)]
        if len(t["rows"]) > 1:
            out += ["", f"![{regime}: each row's effect against the full model, sorted]({picture_name(regime)})"]
        out.append("")
    return "\n".join(out)


def picture_name(regime: str) -> str:
    return f"effects-{regime}.png"


def effect_metrics(rows: list) -> tuple:
    """The two numbers the picture shows: mAP and Rank-1 over the person's other outfits, or over
    all images where no row has them (the same-clothes regime, or summaries that predate them)."""
    cross = any(c["final_cross_mAP"] for c in rows if c["row"] != "full")
    return ("cross_mAP", "cross_R1") if cross else ("mAP", "R1")


def by_effect(rows: list, metric: str) -> list:
    """The rows other than full, the largest loss against the full model first; rows without
    the number last, in the study's order."""
    rows = [c for c in rows if c["row"] != "full"]
    return sorted(rows, key=lambda c: c[f"final_{metric}"]["diff"] if c[f"final_{metric}"] else math.inf)


VERDICT_COLOURS = {"holds": "tab:green", "within noise": "tab:gray", "contradicted": "tab:red",
                   "too few seeds": "tab:orange"}


def _effects_panel(ax, rows: list, metric: str) -> None:
    """One metric of effects_picture: per row its seeds (ticks), their mean (a dot) and the
    verdict's noise band (a bar of ± 2 pooled s), coloured by the verdict; the claimed side shaded."""
    for y, c in enumerate(rows):
        m = c[f"final_{metric}"]
        if m is None:
            ax.annotate("not in these summaries", (0, y), xytext=(4, 0), textcoords="offset points",
                        va="center", fontsize=8, color="tab:gray")
            continue
        colour, full_mean = VERDICT_COLOURS[m["verdict"]], m["mean"] - m["diff"]
        if m["noise"] is not None:
            ax.errorbar(m["diff"], y, xerr=m["noise"], fmt="none", ecolor=colour, elinewidth=6, alpha=0.3)
        ax.plot([v - full_mean for v in m["values"]], [y] * len(m["values"]), "|", color=colour, markersize=10)
        ax.plot(m["diff"], y, "o", color=colour)
    low, high = ax.get_xlim()
    low, high = min(low, -1.0), max(high, 1.0)
    ax.axvspan(low, 0, color="tab:green", alpha=0.06, linewidth=0)  # the paper: every row scores lower
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_xlim(low, high)
    ax.text(0.01, 1.01, "◀ the paper's claim: the row scores lower", transform=ax.transAxes, fontsize=8,
            color="tab:green")
    ax.set_xlabel(f"{METRICS[metric]}: row minus full (points, final ranking)")


def effects_picture(regime: str, t: dict, path: Path) -> Path | None:
    """One regime at a glance (issue 23): each row's effect on mAP and Rank-1 over the person's
    other outfits (effect_metrics), row minus full over seeds, the rows sorted by the mAP effect;
    the verdict's colour, and each claim's verdict beside the row's name. None without a row to show."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = effect_metrics(t["rows"])
    rows = by_effect(t["rows"], metrics[0])
    if not rows:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(13, 1.6 + 0.55 * len(rows)), sharey=True)
    for ax, metric in zip(axes, metrics):
        _effects_panel(ax, rows, metric)
    axes[0].set_yticks(range(len(rows)), [f"{c['row']} ({c['seeds']} seeds)\n" + _verdicts(c)[0] for c in rows],
                       fontsize=8)
    axes[0].set_ylim(len(rows) - 0.5, -0.5)  # the largest loss on top
    handles = [plt.Line2D([], [], marker="o", linestyle="", color=colour, label=name)
               for name, colour in VERDICT_COLOURS.items()]
    fig.legend(handles=handles, loc="lower center", ncol=4, fontsize=8, frameon=False,
               title="dot: mean over seeds; ticks: each seed; bar: ± 2 pooled std (the verdict's noise band)",
               title_fontsize=8)
    scope = ("over the person's other outfits" if metrics[0] in CROSS
             else "over all images (none over other outfits here)")
    fig.suptitle(f"{regime}: each row against the full model, {scope}", fontsize=11)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def write_table(out: Path) -> list[Path]:
    """Every summary under out/runs -> out/table.{json,md}, out/effects-<regime>.png; the paths."""
    summaries = [json.loads(p.read_text()) for p in sorted((out / "runs").glob("*/*/seed*.json"))]
    table = aggregate(summaries)
    out.mkdir(parents=True, exist_ok=True)  # a new --out where no run has finished yet
    (out / "table.json").write_text(json.dumps(table, indent=1) + "\n")
    (out / "table.md").write_text(markdown(table))
    pictures = [effects_picture(regime, t, out / picture_name(regime)) for regime, t in table.items()]
    return [out / "table.json", out / "table.md", *[p for p in pictures if p]]


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", nargs="+", default=list(ALL_ROWS), choices=list(ABLATIONS),
                        help="rows of train.ABLATIONS (default: full, then each claim's rows in order)")
    parser.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
    parser.add_argument("--regimes", nargs="+", default=list(REGIMES), choices=REGIMES)
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"where summaries and the table go ({RESULTS})")
    parser.add_argument("--table", action="store_true", help="only rebuild the table and pictures")
    parser.add_argument("--hours", type=float, help="start no run that would end after this many hours")
    args = parser.parse_args(argv)
    if not args.table:
        try:
            run_study(args.rows, args.seeds, args.regimes, args.out, extra, args.hours)
        except RuntimeError as err:
            print(f"tools/study.py: error: {err}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("tools/study.py: stopped; run it again to continue", file=sys.stderr)
            return 130
    for path in write_table(args.out):
        print(f"wrote {path}")
    print((args.out / "table.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
