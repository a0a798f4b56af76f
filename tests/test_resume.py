"""Resume: a run stopped after a growth (or before it) and resumed follows the uninterrupted run's
path bit for bit on CPU in one process."""

import pytest

from progtrain.train.checkpoint import list_checkpoints, load_checkpoint
from progtrain.train.engine import train
from progtrain.train.report import read_metrics
from test_train_single import cached_tokenizer, run_config


def losses(out):
    return [(m["step"], m["stage"], m["train_loss"]) for m in read_metrics(f"{out}/metrics.jsonl") if m["event"] == "train"]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    tok = cached_tokenizer(tmp_path_factory, "causal_lm")
    out = tmp_path_factory.mktemp("straight") / "run"
    train(run_config(out, tok, train={"max_steps": 12, "checkpoint_interval": 4},
                     stages=[{"name": "wide", "start_step": 6, "grow": {"hidden_size": 64, "num_layers": 3}}]))
    return tok, out


@pytest.mark.parametrize("stop_at", [8, 4], ids=["killed_after_growth", "resumed_from_before_growth"])
def test_resume_is_bit_identical(straight, tmp_path, stop_at):
    tok, out_a = straight
    cfg = lambda: run_config(tmp_path / "run", tok, train={"max_steps": 12, "checkpoint_interval": 4},  # noqa: E731
                             stages=[{"name": "wide", "start_step": 6, "grow": {"hidden_size": 64, "num_layers": 3}}])
    r = train(cfg(), stop_at_step=stop_at)
    assert r["stopped_at"] == stop_at
    ck = load_checkpoint(r["checkpoint"])
    assert ck.state["step"] == stop_at and ck.state["stage"] == (1 if stop_at > 6 else 0)
    if stop_at > 6:  # the boundary checkpoint of the growth is kept, with its birth maps and history
        boundary = [p for p in list_checkpoints(tmp_path / "run") if load_checkpoint(p).state["boundary"]]
        assert [load_checkpoint(p).state["step"] for p in boundary] == [6]
        assert ck.state["history"][0]["stage_name"] == "wide"
    summary = train(cfg(), resume=True)
    assert losses(tmp_path / "run") == losses(out_a)  # exact float equality, every step
    assert summary["final"]["val_loss"] == read_metrics(f"{out_a}/metrics.jsonl")[-2]["val_loss"]


# Per-element state that a stage adds must survive a restart too. Each option is resumed mid-stage
# (growth at 6, stop at 8, the born elements' warm-up still running): the stage's birth-stage LR
# scales (computed from the grown model at the growth; a resume once recomputed them from the weights
# at the checkpoint and left the path by 2.4e-6 at step 10), the match_dynamics update scales and the born
# elements' warm-up ramp with gradient accumulation.
STAGE_OPTIONS = {
    "lr_scales": ({"lr_scales": {"mode": "norm_ratio"}}, {}),
    "match_dynamics_born_warmup_accum": ({"match_dynamics": True, "born_warmup_steps": 4}, {"grad_accum": 2}),
}


@pytest.mark.parametrize("option", list(STAGE_OPTIONS))
def test_resume_mid_stage_with_update_scales_is_bit_identical(option, tmp_path_factory):
    tok = cached_tokenizer(tmp_path_factory, "causal_lm")
    stage_extra, train_extra = STAGE_OPTIONS[option]

    def cfg(out):
        return run_config(out, tok, train={"max_steps": 10, "eval_interval": 5, "checkpoint_interval": 4, **train_extra},
                          stages=[{"name": "wide", "start_step": 6, "grow": {"hidden_size": 64, "num_layers": 3}, **stage_extra}])

    straight, stopped = tmp_path_factory.mktemp("straight") / "run", tmp_path_factory.mktemp("stopped") / "run"
    train(cfg(straight))
    assert train(cfg(stopped), stop_at_step=8)["stopped_at"] == 8
    ck = load_checkpoint(list_checkpoints(stopped)[-1])
    assert ck.state["step"] == 8 and ck.state["stage"] == 1
    if "lr_scales" in stage_extra:
        assert ck.lr_scales is not None and any((s != 1).any() for s in ck.lr_scales.values())
    train(cfg(stopped), resume=True)
    assert losses(stopped) == losses(straight)  # exact float equality, every step
