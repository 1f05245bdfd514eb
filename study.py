"""Do the paper's claims hold? The ablation study of Tables II-V and Fig. 5 on SynthPEDES.

SynthPEDES knows who is who and what they wear, so each claim of the paper can be tested under
control: every row of the claims below is trained with seeds 0, 1, 2 in both regimes
(cloth-changing and same-clothes) by `train.py`, evaluated on the 90 held-out test identities,
and compared with the full model by one rule (`verdict`). Each finished run leaves a small JSON
summary in results/study/runs/; a study that is stopped continues from them (and an interrupted
run resumes from its last.pt). The table is written to results/study/table.{md,json}.

    python study.py                         # everything; prints the time it expects first
    python study.py --table                 # only rebuild the table from the finished runs
    python study.py --hours 2               # the rows that fit in two hours, in the claims' order
    python study.py --rows full "w/o BDAM" --seeds 0 --regimes same-clothes
    python study.py --rows full -- --max-steps 20    # flags after -- go to every train.py run

Tests: pytest tests/test_study.py
"""
import argparse
import json
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from model import ABLATIONS

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "study"
REGIMES = ("cloth-changing", "same-clothes")
SEEDS = (0, 1, 2)
# train.py fields on top of its SynthPEDES preset: the run length of a study run (README,
# "Do the paper's claims hold on SynthPEDES?", says what the full model reaches with it)
# The default run's length, 541 steps: at 203 (18 photographs per identity) the full model reached
# R1 12.9 / mAP 11.1, against 52.7 / 29.3 at 541 (one run each, 2026-11-28): too short to compare
STUDY_PRESET = {}
MINUTES_PER_RUN = 7.5  # the estimate before any run has finished: the default runs here, 2026-11-28


@dataclass(frozen=True)
class Claim:
    text: str
    source: str  # where the paper makes it
    rows: tuple  # rows of model.ABLATIONS, each compared with "full"


CLAIMS = (  # in the order the study runs them
    Claim("BDAM helps; its cross-attention and its gate each help", "Table II",
          ("w/o BDAM", "w/o cross-attention", "w/o BDAM gate", "shallow BDAM")),
    Claim("the fusion helps; Mamba beats an MLP of the same depth; its gate and alignment help",
          "Table III", ("w/o fusion", "w/o Mamba", "w/o fusion gate", "w/o alignment")),
    Claim("each loss helps; GradNorm beats fixed weights", "Table IV",
          ("w/o L_aln", "w/o L_decouple", "w/o L_info", "w/o L_tri", "w/o GradNorm", "w/o weight regulariser")),
)
ROBUSTNESS_ROWS = ("full", "w/o BDAM", "w/o L_decouple", "w/o L_aln")  # Table V
SETTINGS = ("Standard", "Identity-Only", "Clothes-Conflict")
ALL_ROWS = ("full",) + tuple(row for claim in CLAIMS for row in claim.rows)


def slug(row: str) -> str:
    """A row name as a folder name: "w/o BDAM gate" -> "wo-BDAM-gate"."""
    return row.replace("w/o ", "wo-").replace(" ", "-")


# ----------------------------------------------------------------------------------------------
# Running: one train.py process per (regime, row, seed); its summary is all the study keeps


def summarise(results: dict, row: str, regime: str, seed: int, minutes: float) -> dict:
    """The part of a run's results.json that the table needs: Rank-1 and mAP of both stages (stage
    2 is None without fusion), of each Table V setting, and the gate statistics (Fig. 5)."""
    pick = lambda m: None if m is None else {"R1": m["R1"], "mAP": m["mAP"]}  # noqa: E731
    stages = lambda r: {"stage1": pick(r["stage1"]), "stage2": pick(r["stage2"])}  # noqa: E731
    gates = results.get("gates") or {}
    bdam, fusion = gates.get("bdam"), gates.get("fusion")
    return {"row": row, "regime": regime, "seed": seed, "minutes": round(minutes, 2), **stages(results),
            "robustness": {name: stages(r) for name, r in (results.get("robustness") or {}).items()},
            "gates": {"bdam_mean": bdam and bdam["mean"], "bdam_channel_std": bdam and bdam.get("channel_std"),
                      "fusion_w_img": fusion and fusion["mean"]}}


def summary_path(out: Path, regime: str, row: str, seed: int) -> Path:
    return out / "runs" / regime / slug(row) / f"seed{seed}.json"


def train_command(regime: str, row: str, seed: int, extra: list) -> tuple[list, Path]:
    """The train.py command of one run (a resume when it was interrupted) and its run folder."""
    name = f"study/{regime}/{slug(row)}/seed{seed}"
    run = Path("runs") / name
    if (run / "last.pt").exists():
        return [sys.executable, str(HERE / "train.py"), "--resume", str(run)], run
    flags = {"data": "synth", "seed": str(seed), "synth-regime": regime, "name": name,
             "root": f"data/study-{regime}", **STUDY_PRESET}
    args = [arg for field, value in flags.items() for arg in (f"--{field.replace('_', '-')}", value)]
    return [sys.executable, str(HERE / "train.py"), "--ablation", row, *args, *extra], run


def run_one(regime: str, row: str, seed: int, out: Path, extra: list) -> dict:
    """Train and evaluate one run (its output goes to <run>.log); write and return its summary."""
    command, run = train_command(regime, row, seed, extra)
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
                               f"{run.with_suffix('.log')}. Rerun study.py to continue from there.")
    results = json.loads((run / "results.json").read_text())
    summary = summarise(results, row, regime, seed, (time.time() - start) / 60)
    path = summary_path(out, regime, row, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def run_study(rows, seeds, regimes, out: Path, extra: list, hours: float | None = None) -> None:
    """Every (row, regime, seed) without a summary, one after another, a line per run; rows come
    first so that a study cut short by `hours` leaves whole rows out, the last ones."""
    plan = [(regime, row, seed) for row in rows for regime in regimes for seed in seeds]
    todo = [p for p in plan if not summary_path(out, *p).exists()]
    done = [json.loads(summary_path(out, *p).read_text()) for p in plan if p not in todo]
    per_run = statistics.median(s["minutes"] for s in done) if done else MINUTES_PER_RUN
    print(f"study: {len(plan)} runs, {len(done)} finished (kept in {out / 'runs'}), {len(todo)} to do; "
          f"expected {len(todo) * per_run / 60:.1f} h of CPU time at {per_run:.1f} min per run "
          f"({'median of the finished runs' if done else 'measured on the README machine'})", flush=True)
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


def mean_std(values: list) -> tuple:
    """(mean, sample standard deviation); the deviation is None for fewer than two values."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def verdict(full: list, ablated: list) -> str:
    """The claim "the full model beats the ablated row" on one metric, over seeds: with
    d = mean(full) - mean(ablated) and the pooled standard deviation s = sqrt((s_full^2 +
    s_ablated^2) / 2), it *holds* when d > 2 s, is *contradicted* when d < -2 s, and is
    *within noise* otherwise. Fewer than two seeds on either side: *too few seeds*."""
    if len(full) < 2 or len(ablated) < 2:
        return "too few seeds"
    (m_full, s_full), (m_row, s_row) = mean_std(full), mean_std(ablated)
    d, s = m_full - m_row, ((s_full ** 2 + s_row ** 2) / 2) ** 0.5
    return "holds" if d > 2 * s else "contradicted" if d < -2 * s else "within noise"


def compare(full: list, ablated: list, metric) -> dict:
    """Mean, std, the difference from the full model and the verdict of one metric."""
    f, a = [metric(s) for s in full], [metric(s) for s in ablated]
    mean, std = mean_std(a)
    return {"mean": mean, "std": std, "diff": mean - statistics.fmean(f), "verdict": verdict(f, a)}


def aggregate(summaries: list) -> dict:
    """Per regime: each row against the full model (both stages; the verdict on the final
    ranking's Rank-1 and mAP), Table V's settings for ROBUSTNESS_ROWS (the verdict on the
    Clothes-Conflict mAP), and the full model's gates (Fig. 5)."""
    table = {}
    for regime in REGIMES:
        of = {row: [s for s in summaries if s["regime"] == regime and s["row"] == row] for row in ALL_ROWS}
        full = of["full"]
        if not full:
            continue
        rows = []
        for row in ALL_ROWS:
            runs = of[row]
            if not runs:
                continue
            cell = {"row": row, "seeds": len(runs)}
            for stage in ("stage1", "stage2"):
                for m in ("R1", "mAP"):
                    values = [s[stage][m] for s in runs if s[stage]]
                    cell[f"{stage}_{m}"] = mean_std(values) if values else None
            for m in ("R1", "mAP"):
                cell[f"final_{m}"] = compare(full, runs, lambda s, m=m: final(s)[m])
            rows.append(cell)
        robustness = [{"row": row, **{name: compare(full, of[row], lambda s, n=name: final(s["robustness"][n])["mAP"])
                                      for name in SETTINGS}}
                      for row in ROBUSTNESS_ROWS if of[row] and all(s["robustness"] for s in of[row] + full)]
        gates = {key: mean_std([s["gates"][key] for s in full]) for key in ("bdam_mean", "bdam_channel_std",
                                                                             "fusion_w_img")
                 if all(s["gates"][key] is not None for s in full)}
        table[regime] = {"rows": rows, "robustness": robustness, "gates": gates}
    return table


def _pm(value) -> str:
    if value is None:
        return "-"
    mean, std = value
    return f"{mean:.1f}" + (f" ± {std:.1f}" if std is not None else "")


def markdown(table: dict) -> str:
    """The table as markdown: one section per regime (rows, Table V, Fig. 5)."""
    out = []
    for regime, t in table.items():
        out += [f"### {regime}", "", "| row | seeds | stage-1 R1 | stage-1 mAP | stage-2 R1 | stage-2 mAP | "
                "Δ R1 (final) | Δ mAP (final) | verdict R1 | verdict mAP |", "|---" * 10 + "|"]
        for c in t["rows"]:
            r, m = c["final_R1"], c["final_mAP"]
            out.append(f"| {c['row']} | {c['seeds']} | " + " | ".join(_pm(c[k]) for k in (
                "stage1_R1", "stage1_mAP", "stage2_R1", "stage2_mAP")) +
                f" | {r['diff']:+.1f} | {m['diff']:+.1f} | " + (
                "(reference) | (reference) |" if c["row"] == "full" else f"{r['verdict']} | {m['verdict']} |"))
        if t["robustness"]:
            out += ["", "Table V, final mAP of queries built from the generated descriptions:", "",
                    "| row | " + " | ".join(SETTINGS) + " | Δ Clothes-Conflict | verdict |", "|---" * 6 + "|"]
            for c in t["robustness"]:
                conflict = c["Clothes-Conflict"]
                out.append(f"| {c['row']} | " + " | ".join(_pm((c[n]['mean'], c[n]['std'])) for n in SETTINGS)
                           + f" | {conflict['diff']:+.1f} | "
                           + ("(reference)" if c["row"] == "full" else conflict["verdict"]) + " |")
        if t["gates"]:
            g = t["gates"]
            out += ["", "Fig. 5, the full model: " + "; ".join(
                f"{name} {g[key][0]:.3f}" + (f" ± {g[key][1]:.3f}" if g[key][1] is not None else "")
                for key, name in (("bdam_mean", "BDAM gate g (identity share) mean"),
                                  ("bdam_channel_std", "its per-channel std over images"),
                                  ("fusion_w_img", "fusion W_img mean")) if key in g)]
        out.append("")
    return "\n".join(out)


def write_table(out: Path) -> Path:
    """Aggregate every summary under out/runs into out/table.json and out/table.md."""
    summaries = [json.loads(p.read_text()) for p in sorted((out / "runs").glob("*/*/seed*.json"))]
    table = aggregate(summaries)
    (out / "table.json").write_text(json.dumps(table, indent=1) + "\n")
    (out / "table.md").write_text(markdown(table))
    return out / "table.md"


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", nargs="+", default=list(ALL_ROWS), choices=list(ABLATIONS),
                        help="rows of model.ABLATIONS (default: full, then each claim's rows in order)")
    parser.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
    parser.add_argument("--regimes", nargs="+", default=list(REGIMES), choices=REGIMES)
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"where summaries and the table go ({RESULTS})")
    parser.add_argument("--table", action="store_true", help="only aggregate the finished runs")
    parser.add_argument("--hours", type=float, help="start no run that would end after this many hours")
    args = parser.parse_args(argv)
    if not args.table:
        try:
            run_study(args.rows, args.seeds, args.regimes, args.out, extra, args.hours)
        except RuntimeError as err:
            print(f"study.py: error: {err}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("study.py: stopped; run it again to continue", file=sys.stderr)
            return 130
    print(f"wrote {write_table(args.out)}")
    print((args.out / "table.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
