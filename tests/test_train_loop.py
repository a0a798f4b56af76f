"""The training loop's structure: the TrainState round trip through a checkpoint, the stage-boundary
checkpoint written from the growth's result (no gather back), and engine differences kept inside
progtrain.train.distributed."""

import ast
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from progtrain.errors import ProgtrainConfigError
from progtrain.train import checkpoint as ckpt
from progtrain.train.distributed import Engine, build_accelerator
from progtrain.train.engine import ProgressiveTrainer, TrainState, train
from test_train_single import cached_tokenizer, run_config
from tiny_models import tiny_model

TRAIN_DIR = Path(__file__).resolve().parents[1] / "progtrain" / "train"


def test_train_state_round_trips_through_a_checkpoint(tmp_path):
    """Every TrainState field comes back from save_checkpoint/load_checkpoint, the tensor maps from
    their own files, and the RNG streams continue where they were when the state was taken."""
    gen = torch.Generator().manual_seed(0)
    maps = {k: {"w": torch.rand(3, 4, generator=gen)} for k in ("scales", "lr_scales")}
    state = TrainState(step=12, stage=1, samples=96, tokens=3072, flops=1.5e9, wall_s=7.0, bad_batches=1,
                       history=[{"stage": 1, "stage_name": "wide", "step": 6}],
                       births={"w": torch.randint(0, 2, (3, 4), dtype=torch.int8, generator=gen)}, **maps)
    torch.manual_seed(1), random.seed(1), np.random.seed(1)
    sd = state.state_dict()
    expect = (torch.rand(5), random.random(), np.random.rand())
    rng = [sd.pop("rng")]
    path = ckpt.save_checkpoint(tmp_path, model=tiny_model("gpt2"), moments={}, opt_step=12, state=sd, rng=rng)
    assert sorted(p.name for p in path.glob("*.pt")) == ["births.pt", "lr_scales.pt", "optimizer.pt", "rng.pt", "scales.pt"]
    torch.manual_seed(2), random.seed(2), np.random.seed(2)
    back = TrainState()
    back.load_state_dict(ckpt.load_checkpoint(path).train_state(rank=0))
    assert (torch.equal(torch.rand(5), expect[0]) and random.random() == expect[1] and np.random.rand() == expect[2])
    for name in ("step", "stage", "samples", "tokens", "flops", "bad_batches", "history"):
        assert getattr(back, name) == getattr(state, name), name
    assert back.wall_s >= 7.0
    for name in ("births", "scales", "lr_scales"):
        assert torch.equal(getattr(back, name)["w"], getattr(state, name)["w"]), name


def test_boundary_checkpoint_is_the_grown_state_without_a_gather(tmp_path_factory, monkeypatch):
    """The stage-boundary checkpoint holds the grown model, moments and step exactly as the engine
    holds them after the rebuild, and costs no gather (one gather per growth and per interval
    checkpoint, none for the boundary)."""
    gathers, checked = [], []
    gather = Engine.gather_full_state
    checkpoint = ProgressiveTrainer._checkpoint

    def counted_gather(self, **kwargs):
        gathers.append(self)
        return gather(self, **kwargs)

    def compared_checkpoint(self, boundary=False, full=None):
        if boundary:
            assert full is not None, "the boundary checkpoint must come from the growth's result"
            ref = gather(self.engine)  # what the engine holds now (not counted)
            assert full.step == ref.step > 0
            a, b = full.model.state_dict(), ref.model.state_dict()
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
            assert full.moments.keys() == ref.moments.keys()
            assert all(torch.equal(full.moments[n][k], ref.moments[n][k]) for n in full.moments for k in full.moments[n])
            checked.append(self.state.step)
        return checkpoint(self, boundary, full)

    monkeypatch.setattr(Engine, "gather_full_state", counted_gather)
    monkeypatch.setattr(ProgressiveTrainer, "_checkpoint", compared_checkpoint)
    tok = cached_tokenizer(tmp_path_factory, "causal_lm")
    cfg = run_config(tmp_path_factory.mktemp("boundary") / "run", tok,
                     train={"max_steps": 6, "eval_interval": 3, "checkpoint_interval": 4},
                     stages=[{"name": "wide", "start_step": 3, "grow": {"hidden_size": 64, "num_layers": 3}}])
    train(cfg)
    assert checked == [3]
    assert len(gathers) == 2  # the growth at step 3, the interval checkpoint at step 4
    steps = [ckpt.load_checkpoint(p).state["step"] for p in ckpt.list_checkpoints(cfg.output_dir)]
    assert steps == [3, 4]


def test_sharded_engine_refuses_update_scales():
    engine = Engine(build_accelerator())
    assert engine.kind == "single"
    engine.check_update_scales()  # one process holds full parameters
    for kind in ("zero3", "fsdp"):
        engine.kind = kind
        with pytest.raises(ProgtrainConfigError, match=f"{kind} shards them"):
            engine.check_update_scales()


ENGINE_WORDS = ("single", "ddp", "zero1", "zero2", "zero3", "fsdp", "zero", "deepspeed")


def _code_strings(tree: ast.AST) -> list[str]:
    """String constants of a module that are not docstrings."""
    docs = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                docs.add(id(first.value))
    return [n.value for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docs]


@pytest.mark.parametrize("module", sorted(p.name for p in TRAIN_DIR.glob("*.py") if p.name != "distributed.py"))
def test_no_engine_branches_outside_distributed(module):
    """Only progtrain/train/distributed.py names engine kinds in code or imports DeepSpeed: the loop
    asks the Engine, never which engine it has."""
    tree = ast.parse((TRAIN_DIR / module).read_text())
    words = [s for s in _code_strings(tree) if s.lower() in ENGINE_WORDS or s.lower().startswith(("zero", "deepspeed"))]
    assert not words, f"{module} names engine kinds {words}: put that behind progtrain.train.distributed.Engine"
    imported = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    imported += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert not [m for m in imported if m.split(".")[0] == "deepspeed"], module
