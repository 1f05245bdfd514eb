"""study.py: the verdict rule and the aggregation on made-up run results, and the command itself on
a tiny configuration (two real train.py runs, then a restart that trains nothing)."""
import json
import statistics
from pathlib import Path

import pytest

import study
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
    assert study.verdict([52.0, 52.0], [51.0, 51.0]) == "holds"  # no spread: any difference counts


def summary(row, seed, s1, s2=None, regime="cloth-changing", conflict=None, gate=0.6):
    """A made-up run summary in the format study.summarise writes."""
    metrics = lambda v: None if v is None else {"R1": v, "mAP": v - 5}  # noqa: E731
    robustness = {name: {"stage1": metrics(s1), "stage2": metrics(s2)} for name in study.SETTINGS}
    if conflict is not None:
        robustness["Clothes-Conflict"] = {"stage1": metrics(conflict), "stage2": metrics(conflict)}
    return {"row": row, "regime": regime, "seed": seed, "minutes": 1.0, "stage1": metrics(s1),
            "stage2": metrics(s2), "robustness": robustness,
            "gates": {"bdam_mean": gate, "bdam_channel_std": 0.01, "fusion_w_img": 0.4}}


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
    # no fusion: its final ranking is stage 1 (52, 54, 56) against full's stage 2 (50, 52, 54)
    assert no_fusion["stage2_R1"] is None
    assert no_fusion["final_R1"]["mean"] == 54.0 and no_fusion["final_R1"]["diff"] == pytest.approx(2.0)
    assert no_fusion["final_R1"]["verdict"] == "within noise"  # 2 < 2 x pooled s = 4
    assert rows["w/o Mamba"]["final_R1"]["verdict"] == "too few seeds"
    assert rows["w/o Mamba"]["final_R1"]["std"] is None
    robust = {c["row"]: c for c in table["cloth-changing"]["robustness"]}
    assert list(robust) == ["full", "w/o BDAM"]  # rows of Table V that ran
    assert robust["w/o BDAM"]["Clothes-Conflict"]["diff"] == pytest.approx((21 - 5) - (46 - 5))
    assert robust["w/o BDAM"]["Clothes-Conflict"]["verdict"] == "holds"
    gate_mean, gate_std = table["cloth-changing"]["gates"]["bdam_mean"]
    assert gate_mean == pytest.approx(0.61) and gate_std == pytest.approx(statistics.stdev([0.6, 0.61, 0.62]))
    text = study.markdown(table)
    assert "| w/o BDAM | 3 | 31.0 ± 1.0 | 26.0 ± 1.0 | 32.0 ± 1.0 | 27.0 ± 1.0 | -20.0 | -20.0 | holds | holds |" in text
    assert "| w/o fusion | 3 | 54.0 ± 2.0 | 49.0 ± 2.0 | - | - | +2.0 | +2.0 | within noise | within noise |" in text
    assert "### same-clothes" in text


def test_summarise_keeps_both_stages_table_v_and_gates():
    metrics = lambda r: {"R1": r, "R5": 0.0, "R10": 0.0, "mAP": r / 2, "mINP": 0.0}  # noqa: E731
    results = {"rerank_k": 0, "stage1": metrics(30.0), "stage2": None,
               "robustness": {n: {"stage1": metrics(20.0), "stage2": None} for n in study.SETTINGS},
               "gates": {"bdam": {"mean": 0.4, "std": 0.0, "count": 3, "channel_std": 0.02}, "fusion": None}}
    s = study.summarise(results, "w/o fusion", "same-clothes", 2, 3.21)
    assert s["stage1"] == {"R1": 30.0, "mAP": 15.0} and s["stage2"] is None
    assert s["robustness"]["Clothes-Conflict"] == {"stage1": {"R1": 20.0, "mAP": 10.0}, "stage2": None}
    assert s["gates"] == {"bdam_mean": 0.4, "bdam_channel_std": 0.02, "fusion_w_img": None}
    assert study.final(s) == s["stage1"]


def test_an_interrupted_run_is_resumed_not_restarted(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fresh, run = study.train_command("same-clothes", "w/o BDAM gate", 1, ["--max-steps", "5"])
    assert run == Path("runs/study/same-clothes/wo-BDAM-gate/seed1")
    assert fresh[-2:] == ["--max-steps", "5"] and fresh[fresh.index("--ablation") + 1] == "w/o BDAM gate"
    assert fresh[fresh.index("--synth-regime") + 1] == "same-clothes" and fresh[fresh.index("--seed") + 1] == "1"
    run.mkdir(parents=True)
    (run / "last.pt").write_bytes(b"")
    resumed, _ = study.train_command("same-clothes", "w/o BDAM gate", 1, ["--max-steps", "5"])
    assert resumed[2:] == ["--resume", str(run)]


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
