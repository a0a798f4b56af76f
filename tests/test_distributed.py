"""Distributed execution: growth in the middle of training under DDP and DeepSpeed ZeRO-1/2/3 with 2
CPU processes (subprocesses through the ``launch/`` configs), compared with one process.

Each launch asserts the world size and the engine, because several CPU launch paths silently fall
back to one process or to plain DDP (launch/README.md). One script run per mode covers all checks, so
the suite pays the DeepSpeed start-up (and, on a fresh machine, its one-off op build) three times.
"""

from __future__ import annotations

import json

import pytest
import torch
import transformers as T
from _launch import REPO, run_launch

from progtrain.errors import ProgtrainConfigError
from progtrain.train.distributed import _rebuilt_model, build_accelerator
from tiny_models import FAMILIES, tiny_model

SCRIPT = REPO / "tests" / "dist_scripts" / "grow_midway.py"
DIST_TYPE = {"ddp": "MULTI_CPU", "zero1": "DEEPSPEED", "zero2": "DEEPSPEED", "zero3": "DEEPSPEED"}


def _run(mode: str, out) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    run_launch(mode, SCRIPT, ["--out", str(out)], out / "log.txt")
    return json.loads((out / "result.json").read_text())


@pytest.fixture(scope="module")
def single_run(tmp_path_factory) -> tuple[dict, object]:
    out = tmp_path_factory.mktemp("single")
    return _run("single", out), out


@pytest.fixture(scope="module")
def single(single_run) -> dict:
    return single_run[0]


def _check_run(res: dict, out) -> None:
    """Checks every run must pass, whatever the engine."""
    n_before = res["steps_before"]
    # the growth is function preserving through gather -> grow -> rebuild
    assert res["eval_loss_after_growth"] == pytest.approx(res["eval_loss_before_growth"], rel=1e-5)
    # optimizer surgery: old elements keep their moments at the mapped positions, born ones are 0
    assert res["moments_nonzero_before"] > 0 and res["moments_old_elements"] > 0
    assert res["moments_old_max_abs_diff"] <= 1e-7
    assert res["moments_born_max_abs"] == 0.0
    assert res["step_before_growth"] == n_before and res["step_after_load"] == n_before
    # training went on after the rebuild
    losses = res["losses"]
    assert len(losses) == n_before + 3 and losses[-1] < losses[0] - 0.05
    # the saved model reloads with plain transformers at the grown sizes and computes the same loss
    model = T.GPT2LMHeadModel.from_pretrained(out / "model").eval()
    assert (model.config.n_embd, model.config.n_layer) == (64, 3)
    assert res["final_sizes"] == {"hidden_size": 64, "num_layers": 3}
    batch = torch.tensor(res["eval_batch"])
    with torch.no_grad():
        loss = model(input_ids=batch, labels=batch).loss.item()
    assert loss == pytest.approx(res["eval_loss_final"], abs=1e-5)


def test_single_process_grow_midway(single_run):
    res, out = single_run
    assert res["world_size"] == 1 and res["engine_kind"] == "single"
    _check_run(res, out)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "zero1", "zero2", "zero3"])
def test_two_process_grow_midway(mode, single, tmp_path):
    res = _run(mode, tmp_path)
    assert res["world_size"] == 2, f"{mode}: launched {res['world_size']} process(es), expected 2"
    assert res["engine_kind"] == mode
    assert res["distributed_type"] == f"DistributedType.{DIST_TYPE[mode]}"
    _check_run(res, tmp_path)
    # same global batches and data order as one process: same losses, before and after the growth
    assert len(res["losses"]) == len(single["losses"])
    for step, (a, b) in enumerate(zip(res["losses"], single["losses"])):
        assert abs(a - b) <= 1e-4, f"{mode} step {step}: loss {a} vs single-process {b}"


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        (dict(mixed_precision="fp8"), "mixed_precision"),
        (dict(gradient_accumulation_steps=0), "gradient_accumulation_steps"),
        (dict(deepspeed_config={"zero_optimization": {"stage": 0}}), "stage"),
        (dict(deepspeed_config="/nonexistent/ds.json"), "does not exist"),
    ],
)
def test_build_accelerator_rejects_bad_input(kwargs, needle):
    with pytest.raises(ProgtrainConfigError, match=needle):
        build_accelerator(**kwargs)


@pytest.mark.parametrize("family", FAMILIES)
def test_rebuilt_model_matches(family):
    """The copy gather_full_state / full_model_for_save build under DeepSpeed (fresh model of the same
    class from the gathered parameter values, buffers copied, ties restored) computes the same logits."""
    model = tiny_model(family, head=True)
    values = {n: p.detach().clone() for n, p in model.named_parameters()}
    copy = _rebuilt_model(model, values)
    assert type(copy) is type(model) and not any(p.is_meta for p in copy.parameters())
    assert sorted(n for n, _ in copy.named_parameters()) == sorted(values)
    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = model(input_ids=ids).logits, copy(input_ids=ids).logits
    assert torch.equal(a, b)
    assert copy.get_output_embeddings().weight is copy.get_input_embeddings().weight or not model.config.tie_word_embeddings


def test_deepspeed_with_use_cpu_is_refused(monkeypatch):
    """ACCELERATE_USE_CPU=1 turns DeepSpeed into plain DDP without a word: refuse it."""
    monkeypatch.setenv("ACCELERATE_USE_CPU", "1")
    with pytest.raises(ProgtrainConfigError, match="ACCELERATE_USE_CPU"):
        build_accelerator(deepspeed_config={"zero_optimization": {"stage": 2}})


RECIPE_OVERRIDES = {  # the default tiny GPT-2 run, shrunk: 6 steps, growth (wide) at 2 and (deep) at 4
    "train.max_steps": 6, "train.batch_size": 8, "train.eval_interval": 3, "train.eval_batches": 2,
    "train.checkpoint_interval": 0, "train.log_interval": 1, "data.max_chars": 60000, "data.vocab_size": 300,
    "data.seq_len": 32, "data.val_fraction": 0.05, "stages.0.start_step": 2, "stages.1.start_step": 4,
    # the main job widens with `random` (not exact); these tests check function preservation on 2 processes
    "stages.0.init": "function_preserving",
    # per-element update scales (applied around DeepSpeed's in-backward step under ZeRO-2): the new
    # FFN units' updates ramp from 0 after the first growth, LR rebalancing after the second
    "stages.0.born_warmup_steps": 2, "stages.1.lr_scales": "{mode: norm_ratio}",
}


@pytest.fixture(scope="module")
def recipe_runs(tmp_path_factory) -> dict:
    """``recipes/pretrain_gpt.py`` with the default config under DDP and ZeRO-2 (2 processes each)."""
    runs = {}
    for mode in ("ddp", "zero2"):
        out = tmp_path_factory.mktemp(f"recipe_{mode}")
        args = ["--config", "configs/gpt2_tiny_progressive.yaml", "--output-dir", str(out / "run")]
        for k, v in RECIPE_OVERRIDES.items():
            args += ["--set", f"{k}={v}"]
        run_launch(mode, REPO / "recipes" / "pretrain_gpt.py", args, out / "log.txt")
        runs[mode] = out / "run"
    return runs


def _metrics(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "zero2"])
def test_recipe_two_processes(mode, recipe_runs):
    run = recipe_runs[mode]
    info = json.loads((run / "run_info.json").read_text())
    assert info["world_size"] == 2 and info["engine"] == mode
    metrics = _metrics(run)
    growths = [m for m in metrics if m["event"] == "growth"]
    assert len(growths) == 2
    for g in growths:  # function-preserving growth through gather -> grow -> rebuild, on 2 processes
        assert g["val_loss_after"] == pytest.approx(g["val_loss_before"], rel=1e-5)
    # the final model reloads with plain transformers at the final sizes, tokenizer included
    model = T.AutoModelForCausalLM.from_pretrained(run / "final").eval()
    assert type(model).__name__ == "GPT2LMHeadModel"
    assert (model.config.n_embd, model.config.n_head, model.config.n_layer) == (128, 8, 4)
    tok = T.AutoTokenizer.from_pretrained(run / "final")
    ids = tok("To be, or not to be", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids, labels=ids).loss)


@pytest.mark.slow
def test_recipe_ddp_and_zero2_agree(recipe_runs):
    """Same global batches, same data order, same per-element update scales: DDP and ZeRO-2 train on
    the same loss path (ZeRO-2 ignoring the scales departs from it by 2.6e-2 after the first growth)."""
    a, b = ([m["train_loss"] for m in _metrics(recipe_runs[k]) if m["event"] == "train"] for k in ("ddp", "zero2"))
    assert len(a) == len(b) == RECIPE_OVERRIDES["train.max_steps"]
    assert max(abs(x - y) for x, y in zip(a, b)) <= 1e-4


@pytest.fixture(scope="module")
def recipe_zero3(tmp_path_factory):
    """The same recipe under ZeRO-3 (2 processes), without the update scales ZeRO-3 refuses."""
    out = tmp_path_factory.mktemp("recipe_zero3")
    args = ["--config", "configs/gpt2_tiny_progressive.yaml", "--output-dir", str(out / "run")]
    for k, v in RECIPE_OVERRIDES.items():
        if k not in ("stages.0.born_warmup_steps", "stages.1.lr_scales"):
            args += ["--set", f"{k}={v}"]
    run_launch("zero3", REPO / "recipes" / "pretrain_gpt.py", args, out / "log.txt")
    return out / "run"


def _boundary_checkpoints(run) -> dict:
    from progtrain.train.checkpoint import list_checkpoints, load_checkpoint, load_full_model

    found = {}
    for p in list_checkpoints(run):
        c = load_checkpoint(p)
        if c.state["boundary"]:
            found[c.state["step"]] = (load_full_model(p), c)
    return found


@pytest.mark.slow
def test_recipe_zero3_boundary_checkpoints_hold_the_grown_state(recipe_zero3, recipe_runs):
    """ZeRO-3 writes sharded checkpoints (each rank its DeepSpeed partition file, no full model); the
    stage-boundary ones, written from the grown model's partitions (no gather), consolidate to the full
    grown model: the first one (taken before any update scale acts) matches DDP's full checkpoint, the
    second has the final sizes, and both match the metrics' growth rows. (Their moments: the resume
    test below, bit-identical from a boundary checkpoint.)"""
    from test_fsdp2 import check_sharded_checkpoint

    z3, ddp = _boundary_checkpoints(recipe_zero3), _boundary_checkpoints(recipe_runs["ddp"])
    assert sorted(z3) == sorted(ddp) == [2, 4]
    for step, sizes in ((2, (128, 8, 2)), (4, (128, 8, 4))):
        model, c = z3[step]
        check_sharded_checkpoint(c.path, "zero3")
        assert c.moments is None and c.sharded
        assert (model.config.n_embd, model.config.n_head, model.config.n_layer) == sizes
        assert c.state["stage"] == (1 if step == 2 else 2) and c.state["engine"] == "zero3"
        assert c.state["opt_step"] == step
    (a, _), (b, cb) = z3[2], ddp[2]
    assert not cb.sharded and cb.moments is not None  # DDP keeps the full format
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and max((sa[k] - sb[k]).abs().max().item() for k in sa) <= 1e-5


@pytest.mark.slow
def test_zero3_resume_from_boundary_checkpoint_is_bit_identical(recipe_zero3, tmp_path):
    """ZeRO-3 stopped after the first growth (step 3) and resumed from the stage boundary's sharded
    checkpoint (step 2, the grown model's partitions and Adam state): the uninterrupted run's loss path,
    float for float, through the second growth, and its final weights, bit for bit."""
    import shutil

    from test_fsdp2 import same_weights

    args = ["--config", "configs/gpt2_tiny_progressive.yaml", "--output-dir", str(tmp_path / "run")]
    for k, v in RECIPE_OVERRIDES.items():
        if k not in ("stages.0.born_warmup_steps", "stages.1.lr_scales"):
            args += ["--set", f"{k}={v}"]
    script = REPO / "tests" / "dist_scripts" / "train_run.py"
    run_launch("zero3", script, [*args, "--stop-at", "3"], tmp_path / "log0.txt")
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "step-00000003")
    run_launch("zero3", script, [*args, "--resume"], tmp_path / "log1.txt")
    losses = [[m["train_loss"] for m in _metrics(r) if m["event"] == "train"] for r in (tmp_path / "run", recipe_zero3)]
    assert len(losses[0]) == RECIPE_OVERRIDES["train.max_steps"] and losses[0] == losses[1]
    assert same_weights(tmp_path / "run" / "final", recipe_zero3 / "final")


#: the growth benchmark's worker at a small size: 8 equal blocks (largest parameter 1 MiB of 25 MiB), so a
#: full copy of the model stands out of the RSS noise; grown to 12 blocks
MEMORY_SIZES = ["--hidden", "256", "--layers", "8", "--target-layers", "12", "--vocab", "512", "--seq", "32",
                "--batch", "4", "--steps", "2"]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["zero3", "fsdp2"])
def test_growth_builds_the_full_state_on_the_main_process_only(mode, tmp_path):
    """Under ZeRO-3 and FSDP2 a growth (``benchmarks/growth_memory.py``'s worker: gather with
    ``main_only``, ``Engine.grow``, moment surgery, release, prepare, ``load_moments``) builds the full
    model and moments on the main process only: the other rank holds no byte of the gathered model, its
    moments or the grown model (all meta), and its resident memory during the growth rises above its
    steady-training peak by less than the full state the main process built (each parameter is
    materialised, filled from the main process and partitioned in turn). Measured at these sizes
    (2026-11-30, two runs): ZeRO-3 +58 / +59 MB on rank 1 against a 111 MB bound (mostly the grown model's
    larger partitions and the old engine's buffers, which outlive ``release``), FSDP2 -28 / -17 MB; ZeRO-3
    before, when every rank gathered and grew the whole state: +173 MB."""
    run_launch(mode, REPO / "benchmarks" / "growth_memory.py", ["--worker-out", str(tmp_path / "rows"), *MEMORY_SIZES],
               tmp_path / "log.txt")
    rows = {r["rank"]: r for r in (json.loads(p.read_text()) for p in (tmp_path / "rows").glob("rank*.json"))}
    assert sorted(rows) == [0, 1] and {r["engine"] for r in rows.values()} == {mode}
    model_mb = rows[0]["params"] * 4 / 2**20  # the old model's fp32 parameters
    assert rows[0]["full_state_mb"] >= 3 * model_mb  # the main process: model, two moments, grown model
    assert rows[1]["full_state_mb"] == 0.0
    assert rows[1]["growth_peak_mb"] - rows[1]["steady_peak_mb"] < rows[0]["full_state_mb"]
