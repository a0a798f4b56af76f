"""The init-strategy ablation's report logic (benchmarks/ablation.py): reading a run's metrics,
aggregating seeds, the paired difference, the exactness label, the table and the run configs.
No training here."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("ablation", ROOT / "benchmarks" / "ablation.py")
ab = importlib.util.module_from_spec(_spec)
sys.modules["ablation"] = ab  # dataclasses look the module up while the file runs
_spec.loader.exec_module(ab)


def _rows(before, after, end, exact=True, dev=1e-7, growth_s=0.3, step=150, max_steps=300):
    """metrics.jsonl rows as the engine writes them for a run resumed at the growth step: the small
    run's evals up to the growth step, the growth event, later evals."""
    return [
        {"event": "eval", "step": 0, "val_loss": 7.6},
        {"event": "eval", "step": step, "val_loss": before},  # the small model, before the growth
        {"event": "start", "step": step},
        {"event": "growth", "step": step, "val_loss_before": before, "val_loss_after": after, "exact": exact,
         "deviation": dev, "growth_s": growth_s, "params": 675328},
        {"event": "train", "step": step + 10, "train_loss": 5.0},
        {"event": "eval", "step": step + 50, "val_loss": (after + end) / 2},
        {"event": "eval", "step": max_steps, "val_loss": end},
        {"event": "end", "step": max_steps},
    ]


def test_arm_result_reads_growth_and_end():
    r = ab.arm_result(_rows(5.5, 5.6, 5.0, exact=False, dev=0.2, growth_s=1.25), 300,
                      {"notes": ["n1"], "strategy_report": {"x": 1}})
    assert r["val_loss_before"] == 5.5 and r["val_loss_after"] == 5.6 and r["val_loss_end"] == 5.0
    assert r["exact"] is False and r["deviation"] == 0.2 and r["growth_s"] == 1.25
    assert r["notes"] == ["n1"] and r["strategy_report"] == {"x": 1}
    # the curve starts right after the growth; the small model's eval at the same step is not in it
    assert r["curve_after_growth"] == [(150, 5.6), (200, 5.3), (300, 5.0)]


def test_arm_result_refuses_incomplete_runs():
    rows = _rows(5.5, 5.5, 5.0)
    with pytest.raises(ValueError, match="growth"):
        ab.arm_result([x for x in rows if x["event"] != "growth"], 300)
    with pytest.raises(ValueError, match="last step"):
        ab.arm_result(rows, 400)  # stopped before max_steps


def test_mean_std_and_format():
    ms = ab.mean_std([1.0, 2.0, 3.0, None, float("nan")])
    assert ms["n"] == 3 and ms["mean"] == pytest.approx(2.0) and ms["std"] == pytest.approx(1.0)
    assert ab.mean_std([4.0]) == {"mean": 4.0, "std": 0.0, "n": 1}
    assert ab.mean_std([None])["mean"] is None
    assert ab.fmt_ms({"mean": 5.12345, "std": 0.0123}) == "5.123 ± 0.012"
    assert ab.fmt_ms({"mean": 0.02, "std": 0.01}, signed=True) == "+0.020 ± 0.010"
    assert ab.fmt_ms({"mean": None, "std": None}) == "-"


def test_exact_label():
    assert ab.exact_label([{"exact": True, "deviation": 1e-7}] * 3) == "yes"
    assert ab.exact_label([{"exact": False, "deviation": 0.1}, {"exact": False, "deviation": 0.3}]) == "no (dev 3.0e-01)"
    assert ab.exact_label([{"exact": True, "deviation": 1e-7}, {"exact": False, "deviation": 0.3}]) == "1/2 seeds (dev 3.0e-01)"
    assert ab.exact_label([]) == "-"


def _result(before, after, end, exact=True, dev=1e-7, growth_s=0.3):
    return ab.arm_result(_rows(before, after, end, exact, dev, growth_s), 300)


def test_aggregate_paired_difference_and_failures():
    per_seed = {
        "function_preserving": {0: _result(5.5, 5.5, 5.00), 1: _result(5.7, 5.7, 5.20), 2: _result(5.6, 5.6, 5.10)},
        "random": {0: _result(5.5, 5.9, 5.10), 1: _result(5.7, 6.1, 5.32), 2: {"error": "RuntimeError: boom"}},
    }
    rows = {r["strategy"]: r for r in ab.aggregate(per_seed)}
    fp, rnd = rows["function_preserving"], rows["random"]
    assert fp["n"] == 3 and fp["val_loss_end"]["mean"] == pytest.approx(5.1) and fp["val_loss_end"]["std"] == pytest.approx(0.1)
    assert fp["growth_jump"]["mean"] == pytest.approx(0.0)
    # the paired difference uses only seeds where both ran: (0.10, 0.12) -> mean 0.11, std 0.0141
    assert rnd["n"] == 2 and rnd["failed"] == [2] and rnd["errors"] == ["RuntimeError: boom"]
    assert rnd["end_minus_ref"]["mean"] == pytest.approx(0.11) and rnd["end_minus_ref"]["n"] == 2
    assert rnd["end_minus_ref"]["std"] == pytest.approx(math.sqrt(2) * 0.01)
    assert rnd["growth_jump"]["mean"] == pytest.approx(0.4)
    # unpaired, the seed spread (0.15) would hide a difference the pairing shows clearly
    assert rnd["val_loss_end"]["std"] > 10 * rnd["end_minus_ref"]["std"]

    table = ab.markdown_table(ab.aggregate(per_seed))
    lines = table.strip().splitlines()
    assert len(lines) == 4 and lines[0].startswith("| strategy |") and lines[1].startswith("|---|")
    assert all(line.count("|") == lines[0].count("|") for line in lines)
    assert "| `random` | 5.600 ± 0.141 | 6.000 ± 0.141 | 5.210 ± 0.156 | +0.110 ± 0.014 | yes | 0.30 ± 0.00 | 2 (1 failed) |" in table
    assert "| `function_preserving` |" in table and "| - |" in table

    text = " ".join(ab.findings(ab.aggregate(per_seed)))
    assert "Lowest end-of-run loss: `function_preserving`" in text
    assert "`random` (+0.110)" in text and "not a significance test" in text  # beyond 2 std of the paired difference
    assert "`random` (+0.400)" in text  # the growth jump


def test_findings_with_one_seed_claim_no_significance():
    per_seed = {"function_preserving": {0: _result(5.5, 5.5, 5.0)}, "gradmax": {0: _result(5.5, 5.5, 4.9)}}
    text = " ".join(ab.findings(ab.aggregate(per_seed)))
    assert "no seed spread" in text and "exceeds twice" not in text


def test_run_dict_sets_steps_seed_and_arm():
    base = yaml.safe_load((ROOT / "benchmarks" / "configs" / "ablation_gpt2_tiny.yaml").read_text())
    arm = ab.ARMS["variance_transfer_lr"]
    d = ab.run_dict(base, 2, 120, 80, Path("/x/run"), arm)
    assert d["seed"] == 2 and d["output_dir"] == "/x/run" and d["train"]["max_steps"] == 200
    st = d["stages"][0]
    assert st["start_step"] == 120 and st["init"] == "variance_transfer" and st["lr_scales"] == {"mode": "norm_ratio"}
    small = ab.run_dict(base, 2, 120, 80, Path("/x/small"), None)
    # the shared small run has the same schedule (max_steps) as every arm
    assert small["train"]["max_steps"] == 200 and small["stages"][0]["start_step"] == 120
    assert base["train"]["max_steps"] == 300  # the base dict is not mutated
    from progtrain.train.config import from_dict

    cfg = from_dict(d)  # a valid run config
    assert cfg.stages[0].lr_scales.mode == "norm_ratio"
    assert from_dict(ab.run_dict(base, 0, 150, 150, Path("/x/g"), ab.ARMS["gradinit"])).stages[0].init_kwargs == {"iters": 100}


def test_arm_result_with_several_growths():
    rows = _rows(5.5, 5.6, 5.0, exact=True, dev=1e-7, growth_s=0.5)
    later = {"event": "growth", "step": 160, "val_loss_before": 5.4, "val_loss_after": 5.45, "exact": False,
             "deviation": 0.03, "growth_s": 0.25, "params": 900000}
    rows.insert(4, later)
    r = ab.arm_result(rows, 300)
    assert r["n_growths"] == 2 and r["growth_step"] == 150
    assert r["val_loss_before"] == 5.5 and r["val_loss_after"] == 5.6  # around the first growth
    assert r["exact"] is False and r["deviation"] == 0.03  # every growth must be exact; the largest deviation
    assert r["growth_s"] == pytest.approx(0.75) and r["params_after"] == 900000


# ---------------------------------------------------------------------- the operator league (benchmarks/operators.py)
sys.path.insert(0, str(ROOT / "benchmarks"))
_ospec = importlib.util.spec_from_file_location("operators", ROOT / "benchmarks" / "operators.py")
ops = importlib.util.module_from_spec(_ospec)
sys.modules["operators"] = ops
_ospec.loader.exec_module(ops)


def test_league_config_has_12_arms_with_papers_all_ending_at_the_same_sizes():
    conf = ops.load_config(ops.DEFAULT_CONFIG)
    arms = conf["arms"]
    assert len(arms) >= 12 and len({a["name"] for a in arms}) == len(arms)
    assert all(a["paper"].strip() for a in arms) and conf["defaults"]["reference"] == "function_preserving"
    assert len(conf["defaults"]["seeds"]) >= 3
    names = {a["name"] for a in arms}
    assert {"random", "function_preserving", "depth_zero_out", "depth_stack", "depth_middle", "msg_masked_random",
            "moments_carry", "moments_reset", "aki", "tiling_hypercloning", "variance_transfer_lr", "mixture",
            "gradinit", "signed_split", "gradmax"} <= names
    for a in arms:  # each is runnable here, or refused only for a stage option this progtrain lacks
        why = ops.check_arm(conf["run"], a, 150, 150)
        assert why is None or why.startswith(ops.UNAVAILABLE), (a["name"], why)
    # HyperCloning's ~10 dB SNR on each of the k = 2 copies: SNR = 1 / (s^2 k (k - 1))
    s = next(a for a in arms if a["name"] == "tiling_hypercloning")["stage"]["grow"]["symmetry_noise"]
    assert 10 * math.log10(1 / (s ** 2 * 2 * 1)) == pytest.approx(10.0, abs=0.01)


def test_run_dict_merges_the_arm_stage_and_extra_growths():
    conf = ops.load_config(ops.DEFAULT_CONFIG)
    vt = next(a for a in conf["arms"] if a["name"] == "variance_transfer_lr")
    d = ops.run_dict(conf["run"], 4, 150, 150, Path("/x"), vt)
    assert d["seed"] == 4 and d["train"]["max_steps"] == 300
    assert [s["start_step"] for s in d["stages"]] == [150, 160, 170, 180]
    assert all(s["init"] == "variance_transfer" and s["lr_scales"] == {"mode": "norm_ratio"} for s in d["stages"])
    assert d["stages"][0]["grow"] == {"hidden_size": 80, "num_heads": 5, "intermediate_size": 320, "num_layers": 4}
    assert d["stages"][-1]["grow"] == {"hidden_size": 128, "num_heads": 8, "intermediate_size": 512}
    assert ops.final_sizes(d) == ops.final_sizes(ops.run_dict(conf["run"], 4, 150, 150, Path("/x"), None))
    gi = next(a for a in conf["arms"] if a["name"] == "gradinit")
    assert ops.run_dict(conf["run"], 0, 20, 40, Path("/x"), gi, quick=True)["stages"][0]["init_kwargs"] == {"iters": 5}
    assert ops.run_dict(conf["run"], 0, 150, 150, Path("/x"), gi)["stages"][0].get("init_kwargs", {}) == {}
    stack = next(a for a in conf["arms"] if a["name"] == "depth_stack")
    g = ops.run_dict(conf["run"], 0, 150, 150, Path("/x"), stack)["stages"][0]["grow"]
    assert g == {"hidden_size": 128, "num_heads": 8, "intermediate_size": 512, "num_layers": 4,
                 "depth_init": "copy", "layer_placement": "stack"}
    assert conf["run"]["stages"][0]["grow"].get("depth_init") is None  # the shared config is not mutated
    # the depth arms differ in where the new layer comes from (at 2 -> 4 layers stack and middle coincide)
    from progtrain.growth.spec import placement_sources

    old, new = conf["run"]["model"]["config"]["n_layer"], conf["run"]["stages"][0]["grow"]["num_layers"]
    sources = {p: placement_sources(old, new, p)[0] for p in ("interleave", "stack", "middle")}
    assert len({tuple(v) for v in sources.values()}) == 3, sources


def test_check_arm_reports_an_unknown_stage_option_as_not_available_and_refuses_other_errors():
    conf = ops.load_config(ops.DEFAULT_CONFIG)
    why = ops.check_arm(conf["run"], {"name": "x", "paper": "p", "stage": {"no_such_option": 3}}, 150, 150)
    assert why.startswith("option not available") and "no_such_option" in why
    with pytest.raises(ops.ConfigError, match="unknown init|init"):
        ops.check_arm(conf["run"], {"name": "x", "paper": "p", "stage": {"init": "no_such_strategy"}}, 150, 150)
    with pytest.raises(ops.ConfigError, match="same sizes"):
        ops.check_arm(conf["run"], {"name": "x", "paper": "p", "stage": {"grow": {"num_layers": 3}}}, 150, 150)


def test_load_config_refuses_bad_arms(tmp_path):
    conf = yaml.safe_load(ops.DEFAULT_CONFIG.read_text())
    for arms, msg in [([{"name": "a"}], "needs a 'name' and a 'paper'"),
                      ([{"name": "a", "paper": "p"}, {"name": "a", "paper": "q"}], "appears twice"),
                      ([{"name": "a", "paper": "p", "stages": {}}], "unknown key"),
                      ([{"name": "a", "paper": "p", "extra_growths": [{"grow": {}}]}], "'after'")]:
        p = tmp_path / "c.yaml"
        p.write_text(yaml.safe_dump(dict(conf, arms=arms)))
        with pytest.raises(ops.ConfigError, match=msg):
            ops.load_config(p)


def test_cli_unknown_arm_is_one_line_exit_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        ops.main(["--arms", "nope", "--out", str(tmp_path / "o"), "--work-dir", str(tmp_path / "w")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown arm(s) ['nope']" in err[0]
    assert not (tmp_path / "o").exists() and not (tmp_path / "w").exists()


def test_operators_json_schema_and_table():
    arms = [{"name": "function_preserving", "paper": "Net2Net", "notes": "ref"},
            {"name": "random", "paper": "fresh", "notes": "r"},
            {"name": "moments_carry", "paper": "Staged Training", "notes": "m"},
            {"name": "gradmax", "paper": "GradMax", "notes": "g"}]
    per_seed = {
        "function_preserving": {0: _result(5.5, 5.5, 5.00), 1: _result(5.7, 5.7, 5.20), 2: _result(5.6, 5.6, 5.10)},
        "random": {0: _result(5.5, 5.9, 5.10), 1: _result(5.7, 6.1, 5.32), 2: {"error": "RuntimeError: boom"}},
        "gradmax": {0: {"error": "ValueError: x"}},
    }
    rows = ops.league_rows(arms, per_seed, {"moments_carry": "option not available: moments"}, "function_preserving")
    data = json.loads(json.dumps({"arms": rows}))  # what operators.json holds
    assert [r["name"] for r in data["arms"]] == [a["name"] for a in arms]
    for r in data["arms"]:
        assert {"name", "paper", "seeds", "final_val_loss", "status"} <= set(r)
        assert isinstance(r["seeds"], list) and all(isinstance(s, int) for s in r["seeds"])
    fp, rnd, mc, gm = data["arms"]
    assert fp["seeds"] == [0, 1, 2] and fp["final_val_loss"] == pytest.approx(5.1) and fp["status"] == "ok"
    assert rnd["seeds"] == [0, 1] and rnd["final_minus_reference"]["mean"] == pytest.approx(0.11)
    assert rnd["status"] == "ok (some seeds failed)" and rnd["failed"] == [2]
    assert mc["status"] == "option not available" and mc["seeds"] == [] and mc["final_val_loss"] is None
    assert gm["status"] == "failed" and gm["seeds"] == [] and gm["final_val_loss"] is None
    table = ops.markdown_table(rows, "function_preserving")
    lines = table.strip().splitlines()
    assert len(lines) == 6 and all(line.count("|") == lines[0].count("|") for line in lines)
    assert lines[2].startswith("| `function_preserving` |") and lines[3].startswith("| `random` |")  # ranked
    assert "| `moments_carry` | Staged Training | option not available |" in table
    assert "failed: ValueError: x" in table
    text = " ".join(ops.findings(rows, "function_preserving"))
    assert "Not run (option not available in this progtrain): `moments_carry`." in text


def test_league_arms_branch_off_the_small_checkpoint_with_their_own_stage(tmp_path):
    """Each arm resumes the shared small model's checkpoint with a stage config that differs from the
    small run's (another init): the harness must allow that change, or every arm but the reference
    fails on the resume check (it did)."""
    ops.main(["--quick", "--seeds", "7", "--arms", "function_preserving", "random", "--jobs", "1",
              "--work-dir", str(tmp_path)])
    arms = {a["name"]: a for a in json.loads((tmp_path / "quick" / "operators.json").read_text())["arms"]}
    assert arms["random"]["status"] == "ok" and arms["function_preserving"]["status"] == "ok", arms
    assert arms["random"]["val_loss_after"]["mean"] != arms["random"]["val_loss_before"]["mean"]  # really random
