"""The progressive-vs-scratch report: crossing interpolation, ratios, never-reached runs, seeds."""

import json
import math

import pytest

from progtrain.benchmark import Curve, aggregate, compare, first_crossing, markdown_table, mean_std, plot_curves


def _curve(name, flops, losses, wall_per_flop=1.0, growth=()):
    pts = [{"flops": f, "wall_s": f * wall_per_flop, "val_loss": l} for f, l in zip(flops, losses)]
    return Curve(name, pts, growth_events=[pts[i] | {"stage": 1} for i in growth], growth_seconds=[0.5] * len(growth),
                 total_wall_s=pts[-1]["wall_s"])


def test_first_crossing_interpolates_linearly():
    assert first_crossing([0, 10, 20], [5.0, 3.0, 1.0], 2.0) == pytest.approx(15.0)
    assert first_crossing([0, 10, 20], [5.0, 3.0, 1.0], 5.0) == 0.0
    assert first_crossing([0, 10, 20], [5.0, 3.0, 3.0], 3.0) == pytest.approx(10.0)
    assert first_crossing([0, 10, 20], [5.0, 4.0, 3.5], 3.0) is None
    # the FIRST crossing counts, even if the loss goes back up afterwards
    assert first_crossing([0, 10, 20, 30], [5.0, 2.0, 4.0, 1.0], 3.0) == pytest.approx(10 * 2 / 3)


def test_compare_ratios_and_reached():
    scratch = _curve("scratch", [0, 100, 200, 300, 400], [6.0, 4.0, 3.0, 2.5, 2.0])
    prog = _curve("progressive", [0, 50, 100, 150, 200, 250], [6.0, 4.0, 3.0, 2.4, 2.0, 1.9], wall_per_flop=1.5, growth=[2])
    r = compare(scratch, prog)
    assert r["L_star"] == 2.0
    assert r["flops_to_L_star_scratch"] == pytest.approx(400)
    assert r["flops_to_L_star_progressive"] == pytest.approx(200)
    assert r["flops_ratio"] == pytest.approx(0.5)
    assert r["wallclock_ratio"] == pytest.approx(0.75)  # 300 s vs 400 s
    assert r["reached"] is True and r["miss"] == 0.0
    assert r["growth_event_fraction"] == pytest.approx(0.5 / 375)


def test_never_reached_is_reported_with_the_miss():
    scratch = _curve("scratch", [0, 100, 200], [6.0, 3.0, 2.0])
    prog = _curve("progressive", [0, 50, 100], [6.0, 3.0, 2.3])
    r = compare(scratch, prog)
    assert r["reached"] is False
    assert r["flops_ratio"] is None and r["wallclock_ratio"] is None
    assert r["miss"] == pytest.approx(0.3)
    s = aggregate([r, compare(scratch, _curve("progressive", [0, 100], [6.0, 1.5]))])
    assert s["reached"] is False and s["reached_seeds"] == 1
    assert s["flops_ratio"] == pytest.approx((100 * 4 / 4.5) / 200)  # mean over the seeds that reached L*
    table = markdown_table(s)
    assert "1/2 seeds" in table and "above L* by" in table


def test_aggregate_mean_std():
    assert mean_std([1.0, 3.0]) == {"mean": 2.0, "std": pytest.approx(math.sqrt(2)), "n": 2}
    assert mean_std([None]) == {"mean": None, "std": None, "n": 0}


def test_curve_from_metrics_and_plot(tmp_path):
    rows = [
        {"step": 0, "stage": 0, "flops": 0, "wall_s": 0.0, "val_loss": 6.0},
        {"step": 5, "stage": 0, "flops": 10, "wall_s": 1.0, "loss": 5.0},
        {"step": 10, "stage": 0, "flops": 20, "wall_s": 2.0, "val_loss": 4.0},
        {"step": 10, "stage": 1, "flops": 20, "wall_s": 2.5, "val_loss": 4.0, "growth_s": 0.4},
        {"step": 20, "stage": 1, "flops": 60, "wall_s": 5.0, "val_loss": 3.0},
    ]
    p = tmp_path / "metrics.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    c = Curve.from_metrics("progressive", p)
    assert [q["val_loss"] for q in c.points] == [6.0, 4.0, 4.0, 3.0]
    assert len(c.growth_events) == 1 and c.growth_events[0]["step"] == 10
    assert c.growth_seconds == [0.4] and c.total_wall_s == 5.0
    out = tmp_path / "plot.png"
    plot_curves({"progressive": [c]}, "flops", out, l_star=3.5)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------- held-out seeds protocol
from progtrain.benchmark import check_held_out_seeds, default_held_out_seeds, headline  # noqa: E402


def test_held_out_seeds_must_be_three_distinct_non_tuning_seeds():
    check_held_out_seeds([1, 2, 3], tuning=[0])  # accepted
    with pytest.raises(ValueError, match=r"seed\(s\) \[0\] tuned the schedule"):
        check_held_out_seeds([0, 1, 2], tuning=[0])
    with pytest.raises(ValueError, match="at least 3 held-out seeds, got 2"):
        check_held_out_seeds([2, 3], tuning=[0])
    with pytest.raises(ValueError, match="repeat"):
        check_held_out_seeds([2, 2, 3], tuning=[])
    assert default_held_out_seeds([0]) == [1, 2, 3]
    assert default_held_out_seeds([0, 2, 5]) == [1, 3, 4]
    assert default_held_out_seeds([]) == [0, 1, 2]


def test_a_seed_that_misses_makes_the_headline_not_reached_with_its_miss():
    scratch = _curve("scratch", [0, 100, 200], [6.0, 3.0, 2.0])
    hit = _curve("progressive", [0, 50, 100], [6.0, 2.5, 1.9])
    miss = _curve("progressive", [0, 50, 100], [6.0, 2.5, 2.089])
    rows = []
    for seed, prog in ((1, hit), (2, miss), (3, hit)):
        rows.append(compare(scratch, prog) | {"seed": seed})
    s = aggregate(rows)
    assert s["reached"] is False and s["reached_seeds"] == 2
    assert s["not_reached"] == [{"seed": 2, "miss": pytest.approx(0.089)}]
    assert s["headline"] == "not reached in 1/3 seeds (seed 2 missed L* by 0.0890 nats)"
    assert [r["seed"] for r in s["per_seed"]] == [1, 2, 3]  # per-seed rows kept
    s["held_out_seeds"] = [1, 2, 3]
    table = markdown_table(s)
    assert "| headline (held-out seeds 1, 2, 3) | not reached in 1/3 seeds (seed 2 missed L* by 0.0890 nats) |" in table
    # every seed reaching L* gives the ratios instead
    ok = aggregate([compare(scratch, hit) | {"seed": k} for k in (1, 2, 3)])
    assert ok["not_reached"] == [] and ok["headline"].startswith("reached L* in 3/3 seeds at ")
    assert headline({"per_seed": []}) == "no seeds"


# ---------------------------------------------------------------------- the benchmark script's protocol
import importlib.util  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import yaml  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("progressive_vs_scratch", ROOT / "benchmarks" / "progressive_vs_scratch.py")
pvs = importlib.util.module_from_spec(_spec)
sys.modules["progressive_vs_scratch"] = pvs
_spec.loader.exec_module(pvs)


def test_every_preset_declares_its_tuning_seeds_and_long_trains_10_tokens_per_param():
    for name, preset in pvs.PRESETS.items():
        d, protocol = pvs.split_benchmark_block(yaml.safe_load(Path(preset["config"]).read_text()), name)
        assert "benchmark" not in d and isinstance(protocol["tuning_seeds"], list), name
    d, _ = pvs.split_benchmark_block(yaml.safe_load(Path(pvs.PRESETS["long"]["config"]).read_text()), "long")
    t = pvs.tokens_per_param(d)
    assert t["tokens"] == d["train"]["max_steps"] * d["train"]["batch_size"] * d["data"]["seq_len"]
    assert t["tokens_per_param"] >= 10.0
    tiny, _ = pvs.split_benchmark_block(yaml.safe_load(Path(pvs.PRESETS["tiny"]["config"]).read_text()), "tiny")
    assert pvs.tokens_per_param(tiny)["final_params"] == t["final_params"]  # the same sizes, ~9x the tokens


def test_benchmark_block_is_required_and_checked():
    with pytest.raises(ValueError, match="declares no benchmark.tuning_seeds"):
        pvs.split_benchmark_block({"model": {}}, "x.yaml")
    with pytest.raises(ValueError, match="list of integer seeds"):
        pvs.split_benchmark_block({"benchmark": {"tuning_seeds": "0"}}, "x.yaml")
    with pytest.raises(ValueError, match="unknown key"):
        pvs.split_benchmark_block({"benchmark": {"tuning_seeds": [], "seeds": [1]}}, "x.yaml")


@pytest.mark.parametrize("seeds, message", [
    (["0", "1", "2"], "tuned the schedule"),
    (["1", "2"], "at least 3 held-out seeds"),
])
def test_cli_refuses_tuning_or_too_few_seeds_before_writing(tmp_path, capsys, seeds, message):
    out = tmp_path / "report"
    with pytest.raises(SystemExit) as e:
        pvs.main(["--seeds", *seeds, "--out", str(out), "--work-dir", str(tmp_path / "runs")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and "--tuning-run" in err[0]
    assert not out.exists() and not (tmp_path / "runs").exists()


def test_cli_refuses_a_scratch_lr_swept_on_a_held_out_seed(tmp_path, capsys):
    cfg = yaml.safe_load(Path(pvs.PRESETS["tiny"]["config"]).read_text())
    cfg["benchmark"] = {"tuning_seeds": [7]}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "report"
    out.mkdir()
    (out / "lr_sweep.json").write_text(json.dumps({"best_lr": 4e-3, "seed": 1}))
    with pytest.raises(SystemExit) as e:
        pvs.main(["--config", str(path), "--out", str(out), "--work-dir", str(tmp_path / "runs")])
    assert e.value.code == 2 and "swept on seed 1, a held-out seed" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["lr_sweep.json"]


def test_indicative_accepts_one_held_out_seed_but_never_a_tuning_seed(tmp_path, capsys):
    out = tmp_path / "report"
    with pytest.raises(SystemExit) as e:
        pvs.main(["--seeds", "0", "--indicative", "--out", str(out), "--work-dir", str(tmp_path / "runs")])
    assert e.value.code == 2 and "tuned the schedule" in capsys.readouterr().err
    assert not out.exists()
    check_held_out_seeds([1], tuning=[0], minimum=1)


def test_parallel_runs_give_the_same_curves_as_back_to_back(tmp_path):
    """--jobs 2 trains each (seed, arm) in a worker process: the same losses as one process."""
    d = yaml.safe_load(Path(pvs.PRESETS["tiny"]["config"]).read_text())
    d, _ = pvs.split_benchmark_block(d, "tiny")
    d["stages"] = []
    d["data"]["vocab_size"] = 300
    d["train"].update(max_steps=4, eval_interval=2, eval_batches=1, log_interval=1, batch_size=2)
    runs = [(1, "scratch", d), (2, "scratch", d)]
    one = pvs.run_all(runs, tmp_path / "one", jobs=1)
    two = pvs.run_all(runs, tmp_path / "two", jobs=2)

    def losses(p):
        return [r["val_loss"] for r in map(json.loads, p.read_text().splitlines()) if r.get("val_loss") is not None]

    for key in one:
        assert losses(one[key]) == losses(two[key]) and len(losses(one[key])) >= 2
    assert losses(one[1, "scratch"]) != losses(one[2, "scratch"])  # the seed reaches the run
    # --reuse keeps a finished run of the same config and trains one whose config differs
    stamp = {k: p.stat().st_mtime_ns for k, p in one.items()}
    again = pvs.run_all(runs, tmp_path / "one", jobs=1, reuse=True)
    assert {k: p.stat().st_mtime_ns for k, p in again.items()} == stamp
    d2 = dict(d, optim=dict(d["optim"], lr=1e-3))
    redo = pvs.run_all([(1, "scratch", d2)], tmp_path / "one", jobs=1, reuse=True)
    assert redo[1, "scratch"].stat().st_mtime_ns != stamp[1, "scratch"]
