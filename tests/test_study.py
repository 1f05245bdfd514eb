"""tools/study.py: the verdict rule and the aggregation on made-up run results (the numbers over other
outfits, Table V's ratios, the 'not testable' rule for the fusion, summaries written before
those were kept, the picture), and the command itself on a tiny configuration (two real train.py
runs, then a restart that trains nothing)."""
import json
import statistics
from pathlib import Path

import pytest

from tools import study
from test_train import SYNTH, TINY


def test_verdict_rule_on_hand_worked_numbers():
    """full 50 52 54 (mean 52, s 2); d = mean(full) - mean(row) against 2 x pooled s = 4."""
    full = [50.0, 52.0, 54.0]
    assert study.verdict(full, [40.0, 42.0, 44.0]) == "holds"  # d = 10 > 4
    assert study.verdict(full, [46.0, 48.0, 50.0]) == "within noise"  # d = 4, not above 2 s
    assert study.verdict(full, [45.0, 48.5, 49.0]) == "holds"  # s_row = 2.18, 2 x pooled 4.18 < 4.5
    assert study.verdict(full, [53.0, 53.5, 54.0]) == "within noise"  # d = -1.5
    assert study.verdict(full, [60.0, 62.0, 64.0]) == "contradicted"  # d = -10
    assert study.verdict(full, [40.0]) == "too few seeds"
    assert study.verdict([52.0, 52.0], [41.0, 41.0]) == "too few seeds"  # no verdict without three seeds
    assert study.verdict([52.0] * 3, [51.0] * 3) == "holds"  # no spread: any difference counts


def test_verdicts_of_several_metrics_combine():
    assert study.combine(["holds", "within noise", "within noise"]) == "holds"
    assert study.combine(["within noise", "contradicted"]) == "contradicted"
    assert study.combine(["holds", "contradicted", "within noise"]) == "mixed"
    assert study.combine(["within noise", "within noise"]) == "within noise"
    assert study.combine(["holds", "too few seeds"]) == "too few seeds"


def summary(row, seed, s1, s2=None, regime="cloth-changing", conflict=None, gate=0.6):
    """A made-up run summary in the format study.summarise wrote before issue 23 (no numbers
    over other outfits, no ratios), as the committed ones are."""
    metrics = lambda v: None if v is None else {"R1": v, "mAP": v - 5}  # noqa: E731
    robustness = {name: {"stage1": metrics(s1), "stage2": metrics(s2)} for name in study.SETTINGS}
    if conflict is not None:
        robustness["Clothes-Conflict"] = {"stage1": metrics(conflict), "stage2": metrics(conflict)}
    return {"row": row, "regime": regime, "seed": seed, "minutes": 1.0, "stage1": metrics(s1),
            "stage2": metrics(s2), "robustness": robustness,
            "gates": {"bdam_mean": gate, "bdam_channel_std": 0.01, "fusion_w_img": 0.4}}


def results(s1, s2=None, cross=None, kept=(1.0, 1.0)):
    """A made-up results.json (evaluate.evaluate_model's keys): Rank-1 s1 / s2 and mAP 5 below
    over all images; over other outfits Rank-1 `cross` and mAP 5 below (None: no other outfits);
    Table V Standard Rank-1 40, Identity-Only and Clothes-Conflict `kept` of it, in both stages."""
    def metrics(r1, other):
        return None if r1 is None else {"R1": r1, "R5": 0.0, "R10": 0.0, "mAP": r1 - 5, "mINP": 0.0, "cross_outfit":
                                        None if other is None else {"R1": other, "mAP": other - 5, "queries": 9}}
    setting = lambda r1: {"stage1": metrics(r1, None), "stage2": metrics(r1 if s2 else None, None)}  # noqa: E731
    return {"stage1": metrics(s1, cross), "stage2": metrics(s2, cross if s2 else None),
            "robustness": {"Standard": setting(40.0), "Identity-Only": setting(40.0 * kept[0]),
                           "Clothes-Conflict": setting(40.0 * kept[1])},
            "gates": {"bdam": {"mean": 0.5, "std": 0.1, "count": 3, "channel_std": 0.2}, "fusion": None}}


def run(row, seed, *args, regime="cloth-changing", **kwargs):
    """A made-up run as tools/study.py keeps it now: summarise on results(*args, **kwargs)."""
    return study.summarise(results(*args, **kwargs), row, regime, seed, 1.0)


def test_aggregate_means_differences_and_verdicts_on_made_up_runs():
    runs = [summary("full", s, 40 + s, 50 + 2 * s, conflict=45 + s, gate=0.6 + 0.01 * s) for s in range(3)]
    runs += [summary("w/o BDAM", s, 30 + s, 31 + s, conflict=20 + s) for s in range(3)]
    runs += [summary("w/o fusion", s, 52 + 2 * s) for s in range(3)]  # stage 1 only, beats full's stage 2
    runs += [summary("w/o Mamba", 0, 10, 10)]
    runs += [summary("full", 0, 1, 1, regime="same-clothes")]
    table = study.aggregate(runs)
    assert set(table) == {"cloth-changing", "same-clothes"}
    rows = {c["row"]: c for c in table["cloth-changing"]["rows"]}
    assert list(rows) == ["full", "w/o BDAM", "w/o fusion", "w/o Mamba"]  # study order, rows with runs
    full, no_bdam, no_fusion = rows["full"], rows["w/o BDAM"], rows["w/o fusion"]
    assert full["stage2_R1"] == (52.0, 2.0) and full["stage1_mAP"] == (36.0, 1.0)
    assert no_bdam["final_R1"]["diff"] == pytest.approx(32 - 52) and no_bdam["final_R1"]["verdict"] == "holds"
    assert no_bdam["final_mAP"]["diff"] == pytest.approx(27 - 47)
    assert no_bdam["final_R1"]["noise"] == pytest.approx(2 * ((4 + 1) / 2) ** 0.5)
    # no fusion: its final ranking is stage 1 (52, 54, 56) against full's stage 2 (50, 52, 54)
    assert no_fusion["stage2_R1"] is None
    assert no_fusion["final_R1"]["mean"] == 54.0 and no_fusion["final_R1"]["diff"] == pytest.approx(2.0)
    assert no_fusion["final_R1"]["verdict"] == "within noise"  # 2 < 2 x pooled s = 4
    # full's stage 2 (50, 52, 54) against its stage 1 (40, 41, 42): the fusion changes the ranking
    assert table["cloth-changing"]["fusion"]["status"] == "testable"
    assert no_fusion["verdicts"] == {"Table III": {"verdict": "within noise",
                                                   "from": {"R1": "within noise", "mAP": "within noise"}}}
    assert rows["w/o Mamba"]["final_R1"]["verdict"] == "too few seeds"
    assert rows["w/o Mamba"]["final_R1"]["std"] is None and rows["w/o Mamba"]["final_R1"]["noise"] is None
    robust = {c["row"]: c for c in table["cloth-changing"]["robustness"]}
    assert list(robust) == ["full", "w/o BDAM"]  # rows of Table V that ran
    assert robust["w/o BDAM"]["Clothes-Conflict"]["diff"] == pytest.approx((21 - 5) - (46 - 5))
    gate_mean, gate_std = table["cloth-changing"]["gates"]["bdam_mean"]
    assert gate_mean == pytest.approx(0.61) and gate_std == pytest.approx(statistics.stdev([0.6, 0.61, 0.62]))
    text = study.markdown(table)
    assert "| w/o BDAM | 3 | 31.0 ± 1.0 | 26.0 ± 1.0 | 32.0 ± 1.0 | 27.0 ± 1.0 | -20.0 | -20.0 |" in text
    assert "| w/o fusion | 3 | 54.0 ± 2.0 | 49.0 ± 2.0 | - | - | +2.0 | +2.0 |" in text
    assert "| Table III: within noise | Table III: Rank-1 within noise, mAP within noise |" in text
    assert "### same-clothes" in text


def test_old_summaries_show_dashes_and_give_no_verdict_on_decoupling():
    """The committed summaries predate the numbers over other outfits: those show as '-' and the
    claims that read them (Tables II and V) get none; Table V's ratios come from their Rank-1s."""
    runs = [summary("full", s, 40 + s, 50 + 2 * s, conflict=45 + s) for s in range(3)]
    runs += [summary("w/o BDAM", s, 30 + s, 31 + s, conflict=20 + s) for s in range(3)]
    runs += [summary("w/o L_info", s, 30 + s, 31 + s) for s in range(3)]
    rows = {c["row"]: c for c in study.aggregate(runs)["cloth-changing"]["rows"]}
    no_bdam = rows["w/o BDAM"]
    assert no_bdam["predates"] and no_bdam["stage1_cross_mAP"] is None and no_bdam["final_cross_mAP"] is None
    assert {v["verdict"] for v in no_bdam["verdicts"].values()} == {"-"}  # Table II and Table V
    # Clothes-Conflict Rank-1 20 + s of Standard's 31 + s, stage 2 (the final ranking)
    assert no_bdam["final_Clothes-Conflict"]["mean"] == pytest.approx(statistics.fmean(
        [(20 + s) / (31 + s) for s in range(3)]))
    assert rows["w/o L_info"]["verdicts"]["Table IV"]["verdict"] == "holds"  # Rank-1 and mAP: kept by all
    text = study.markdown(study.aggregate(runs))
    assert ("| w/o BDAM | - / - | - / - | 100 ± 0% / 100 ± 0% | 68 ± 1% / 66 ± 1% | - | "
            "Table II: -; Table V: - |") in text
    assert "these summaries predate the numbers over other outfits" in text


def test_decoupling_is_read_from_other_outfits_and_ratios_not_rank1():
    """A row below the full model on caption Rank-1 but not over other outfits, and keeping more of
    its Rank-1 under conflicting clothing: its Table II verdict is not 'holds'."""
    runs = [run("full", s, 50 + s, 50 + s, cross=30 + s, kept=(0.9, 0.6)) for s in range(3)]
    runs += [run("w/o cross-attention", s, 40 + s, 40 + s, cross=30.5 + s, kept=(0.9, 0.8)) for s in range(3)]
    runs += [run("w/o BDAM", s, 40 + s, 40 + s, cross=20 + s, kept=(0.9, 0.6)) for s in range(3)]
    rows = {c["row"]: c for c in study.aggregate(runs)["cloth-changing"]["rows"]}
    cross_attention, no_bdam = rows["w/o cross-attention"], rows["w/o BDAM"]
    assert cross_attention["final_R1"]["verdict"] == "holds"  # the caption Rank-1 alone would say so
    assert cross_attention["final_cross_mAP"]["diff"] == pytest.approx(0.5)
    assert cross_attention["stage1_Clothes-Conflict"] == pytest.approx((0.8, 0.0))
    assert cross_attention["verdicts"]["Table II"] == {"verdict": "contradicted", "from": {
        "cross_mAP": "within noise", "Identity-Only": "within noise", "Clothes-Conflict": "contradicted"}}
    assert no_bdam["verdicts"]["Table II"]["verdict"] == "holds"  # other outfits 10 lower, same ratios
    assert no_bdam["verdicts"]["Table V"]["verdict"] == "holds"
    text = study.markdown(study.aggregate(runs))
    assert ("| w/o cross-attention | 31.5 ± 1.0 / 31.5 ± 1.0 | 26.5 ± 1.0 / 26.5 ± 1.0 | 90 ± 0% / 90 ± 0% | "
            "80 ± 0% / 80 ± 0% | +0.5 | Table II: contradicted | Table II: mAP, other outfits within noise, "
            "Identity-Only / Standard within noise, Clothes-Conflict / Standard contradicted |") in text
    assert "| w/o BDAM | 3 | 41.0 ± 1.0 | 36.0 ± 1.0 | 41.0 ± 1.0 | 36.0 ± 1.0 | -10.0 | -10.0 |" in text
    assert "| w/o BDAM | 35.0 ± 0.0 | 31.0 ± 0.0 | 19.0 ± 0.0 | +0.0 | holds |" in text  # read from other outfits


def test_same_clothes_reads_decoupling_from_the_ratios_alone():
    """No query's person has another outfit: the numbers over other outfits are '-', and the
    claims about decoupling read Table V's ratios."""
    runs = [run("full", s, 50 + s, 50 + s, kept=(0.9, 0.9), regime="same-clothes") for s in range(3)]
    runs += [run("w/o BDAM", s, 40 + s, 40 + s, kept=(0.9, 0.5), regime="same-clothes") for s in range(3)]
    no_bdam = study.aggregate(runs)["same-clothes"]["rows"][1]
    assert not no_bdam["predates"] and no_bdam["final_cross_mAP"] is None
    assert no_bdam["verdicts"]["Table II"] == {"verdict": "holds", "from": {"Identity-Only": "within noise",
                                                                            "Clothes-Conflict": "holds"}}


def test_fusion_rows_are_not_testable_when_stage_2_is_within_noise_of_stage_1():
    full = [run("full", s, 50 + s, 50.5 + s, cross=30 + s) for s in range(3)]  # stage 2 +0.5, s = 1
    mamba = [run("w/o Mamba", s, 40 + s, 40 + s, cross=20 + s) for s in range(3)]
    table = study.aggregate(full + mamba)["cloth-changing"]
    assert table["fusion"]["status"] == study.NOT_TESTABLE
    assert table["fusion"]["metrics"]["R1"] == {"diff": pytest.approx(0.5), "verdict": "within noise"}
    assert set(table["fusion"]["metrics"]) == {"R1", "mAP", "cross_mAP"}
    mamba_cell = table["rows"][1]
    assert mamba_cell["final_R1"]["verdict"] == "holds"  # 10 points lower, yet not a verdict on the fusion
    assert mamba_cell["verdicts"]["Table III"]["verdict"] == "not testable at this length"
    text = study.markdown({"cloth-changing": table})
    assert "Table III's rows are **not testable at this length**" in text
    assert ('a 4-epoch run of the full model and of `w/o Mamba`, seeds 0-2, would test them: `python -m tools.study '
            '--rows full "w/o Mamba" --regimes cloth-changing --out results/study-4-epochs -- --epochs 4`') in text
    assert "| Table III: not testable at this length | Table III: the full model's stage 2 is within noise" in text
    # a fusion that adds 10 points makes the rows testable; two seeds of the full model: no verdict either way
    full = [run("full", s, 50 + s, 60 + s, cross=30 + s) for s in range(3)]
    assert study.aggregate(full + mamba)["cloth-changing"]["fusion"]["status"] == "testable"
    assert study.aggregate(full[:2] + mamba)["cloth-changing"]["fusion"]["status"] == "too few seeds"
    assert study.aggregate(full[:2] + mamba)["cloth-changing"]["rows"][1]["verdicts"]["Table III"]["verdict"] \
        == "too few seeds"


def test_table_writes_a_picture_per_regime_with_rows_sorted_by_effect(tmp_path):
    runs = [run("full", s, 50 + s, 50 + s, cross=30 + s) for s in range(3)]
    runs += [run(row, s, 50 + s, 50 + s, cross=30 + s + effect) for s in range(3)
             for row, effect in (("w/o BDAM", -10), ("w/o L_tri", 2), ("w/o GradNorm", -3))]
    runs += [run("full", 0, 50, 50, regime="same-clothes"), run("w/o BDAM", 0, 40, 40, regime="same-clothes")]
    for s in runs:
        path = study.summary_path(tmp_path, s["regime"], s["row"], s["seed"])
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(s))
    written = study.write_table(tmp_path)
    assert [p.name for p in written] == ["table.json", "table.md", "effects-cloth-changing.png",
                                         "effects-same-clothes.png"]
    assert all(p.stat().st_size > 0 for p in written)
    table = json.loads((tmp_path / "table.json").read_text())
    assert study.effect_metrics(table["cloth-changing"]["rows"]) == ("cross_mAP", "cross_R1")
    assert study.effect_metrics(table["same-clothes"]["rows"]) == ("mAP", "R1")  # no other outfits there
    order = study.by_effect(table["cloth-changing"]["rows"], "cross_mAP")
    assert [c["row"] for c in order] == ["w/o BDAM", "w/o GradNorm", "w/o L_tri"]
    assert "![cloth-changing: each row's effect against the full model, sorted](effects-cloth-changing.png)" \
        in (tmp_path / "table.md").read_text()


def test_summarise_keeps_both_stages_other_outfits_table_v_ratios_and_gates():
    metrics = lambda r: {"R1": r, "R5": 0.0, "R10": 0.0, "mAP": r / 2, "mINP": 0.0,  # noqa: E731
                         "cross_outfit": {"R1": r - 10, "R5": 0.0, "R10": 0.0, "mAP": r / 4, "mINP": 0.0, "queries": 5}}
    results = {"rerank_k": 0, "stage1": metrics(30.0), "stage2": None,
               "robustness": {n: {"stage1": metrics(r), "stage2": None}
                              for n, r in zip(study.SETTINGS, (20.0, 15.0, 10.0))},
               "gates": {"bdam": {"mean": 0.4, "std": 0.0, "count": 3, "channel_std": 0.02}, "fusion": None}}
    s = study.summarise(results, "w/o fusion", "same-clothes", 2, 3.21)
    assert s["stage1"] == {"R1": 30.0, "mAP": 15.0, "cross_R1": 20.0, "cross_mAP": 7.5} and s["stage2"] is None
    assert s["robustness"]["Clothes-Conflict"] == {"stage1": {"R1": 10.0, "mAP": 5.0, "cross_R1": 0.0,
                                                              "cross_mAP": 2.5}, "stage2": None}
    assert s["ratios"] == {"Identity-Only": {"stage1": 0.75}, "Clothes-Conflict": {"stage1": 0.5}}
    assert s["gates"] == {"bdam_mean": 0.4, "bdam_channel_std": 0.02, "fusion_w_img": None}
    assert study.final(s) == s["stage1"] and not study.predates(s)
    assert study.value(s, "final", "Clothes-Conflict") == 0.5 and study.value(s, "stage2", "Clothes-Conflict") is None
    results["stage1"]["cross_outfit"] = None  # no query's person has another outfit
    assert study.summarise(results, "full", "same-clothes", 0, 1.0)["stage1"]["cross_mAP"] is None


def test_an_interrupted_run_is_resumed_not_restarted(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fresh, run_dir = study.train_command("same-clothes", "w/o BDAM gate", 1, ["--max-steps", "5"])
    assert run_dir == Path("runs/study/same-clothes/wo-BDAM-gate/seed1")
    assert fresh[-2:] == ["--max-steps", "5"] and fresh[fresh.index("--ablation") + 1] == "w/o BDAM gate"
    assert fresh[fresh.index("--synth-regime") + 1] == "same-clothes" and fresh[fresh.index("--seed") + 1] == "1"
    run_dir.mkdir(parents=True)
    (run_dir / "last.pt").write_bytes(b"")
    resumed, _ = study.train_command("same-clothes", "w/o BDAM gate", 1, ["--max-steps", "5"])
    assert resumed[2:] == ["--resume", str(run_dir)]
    longer, elsewhere = study.train_command("same-clothes", "w/o BDAM gate", 1, ["--epochs", "4"],
                                            Path("results/study-4-epochs"))
    assert elsewhere == Path("runs/study-4-epochs/same-clothes/wo-BDAM-gate/seed1") and "--resume" not in longer
def test_study_command_on_a_tiny_configuration(tmp_path, monkeypatch, capsys):
    """Two real train.py runs (30 identities, 2 steps each), the table they make, and a second
    call that finds both finished and trains nothing."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("TRITON_INTERPRET")  # the child processes use the PyTorch scan
    out = tmp_path / "study"
    argv = ["--rows", "full", "w/o BDAM gate", "--seeds", "0", "--regimes", "cloth-changing", "--out", str(out),
            "--", *SYNTH, *TINY, "--max-steps", "2", "--p", "4", "--k", "2"]
    assert study.main(argv) == 0
    first = capsys.readouterr().out
    assert "2 runs, 0 finished" in first and "[2/2] cloth-changing | w/o BDAM gate | seed 0" in first
    saved = json.loads((out / "runs/cloth-changing/wo-BDAM-gate/seed0.json").read_text())
    results = json.loads(Path("runs/study/cloth-changing/wo-BDAM-gate/seed0/results.json").read_text())
    assert saved["stage1"]["R1"] == results["stage1"]["R1"] and saved["gates"]["bdam_mean"] is None
    full = json.loads((out / "runs/cloth-changing/full/seed0.json").read_text())
    assert 0.0 < full["gates"]["bdam_mean"] < 1.0
    table = json.loads((out / "table.json").read_text())
    assert [c["row"] for c in table["cloth-changing"]["rows"]] == ["full", "w/o BDAM gate"]
    assert table["cloth-changing"]["rows"][1]["final_R1"]["verdict"] == "too few seeds"
    assert (out / "table.md").read_text() == study.markdown(table)
    assert study.main(argv) == 0  # everything is finished: nothing trains again
    assert "2 runs, 2 finished" in capsys.readouterr().out


def test_runs_go_row_by_row_and_hours_leaves_the_last_rows_out(tmp_path, monkeypatch, capsys):
    calls = []

    def fake_run(regime, row, seed, out, extra):
        calls.append((row, regime, seed))
        path = study.summary_path(out, regime, row, seed)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(summary(row, seed, 40.0, regime=regime)))
        return summary(row, seed, 40.0, regime=regime)

    monkeypatch.setattr(study, "run_one", fake_run)
    rows = ["full", "w/o BDAM"]
    study.run_study(rows, [0, 1], list(study.REGIMES), tmp_path, [], hours=None)
    assert calls == [(row, regime, seed) for row in rows for regime in study.REGIMES for seed in (0, 1)]
    calls.clear()
    study.run_study(rows + ["w/o Mamba"], [0, 1], list(study.REGIMES), tmp_path, [], hours=None)
    assert [c[0] for c in calls] == ["w/o Mamba"] * 4  # the 8 finished runs are kept
    assert "12 runs, 8 finished" in capsys.readouterr().out
    calls.clear()
    study.run_study(rows + ["w/o fusion", "w/o L_aln"], [0], ["same-clothes"], tmp_path / "b", [], hours=0.0)
    assert calls == [] and "not run: 4 runs of full, w/o BDAM, w/o fusion, w/o L_aln" in capsys.readouterr().out


def test_the_first_estimate_scales_with_the_epochs_asked_for(tmp_path, monkeypatch, capsys):
    # Before any run is timed, a 4-epoch study expects four default runs' time, so --hours 0.4
    # (24 min) starts none of its 30-minute runs, where the default study starts one of 7.5.
    assert study.epochs_asked(["--epochs", "4"]) == study.epochs_asked(["--workers", "2", "--epochs=4"]) == 4
    assert study.epochs_asked(["--workers", "2"]) == 1
    calls = []

    def fake_run(regime, row, seed, out, extra):
        calls.append(extra)
        return summary(row, seed, 40.0, regime=regime)

    monkeypatch.setattr(study, "run_one", fake_run)
    study.run_study(["full"], [0], ["same-clothes"], tmp_path / "four", ["--epochs", "4"], hours=0.4)
    assert calls == [] and f"{4 * study.MINUTES_PER_RUN:.1f} min per run" in capsys.readouterr().out
    study.run_study(["full"], [0], ["same-clothes"], tmp_path / "one", [], hours=0.4)
    assert calls == [[]] and f"{study.MINUTES_PER_RUN:.1f} min per run" in capsys.readouterr().out
    # a new --out where --hours let no run start still gets its (empty) table, not a traceback
    assert study.main(["--out", str(tmp_path / "new"), "--hours", "0", "--", "--epochs", "4"]) == 0
    assert (tmp_path / "new" / "table.md").exists()
