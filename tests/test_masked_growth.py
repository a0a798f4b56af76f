"""Masked growth (stage option ``mask_steps``, MSG): with ``init: random`` new FFN units, heads and
layers, the validation loss right after the growth equals the loss right before, the final model is
a plain ``transformers`` model that computes what the run logged, a run resumed mid-ramp follows the
uninterrupted run bit for bit, and the same holds under DDP and ZeRO-2 with 2 processes."""

from __future__ import annotations

import json

import pytest
import torch
import transformers as T
import yaml
from _launch import REPO, run_launch

from progtrain import grow
from progtrain.errors import ProgtrainConfigError
from progtrain.train.checkpoint import load_checkpoint
from progtrain.train.data import prepare_data
from progtrain.train.engine import evaluate, train
from progtrain.train.masks import GrowthMasks, mask_spec
from progtrain.train.report import read_metrics
from test_train_single import cached_tokenizer, run_config
from tiny_models import tiny_model

#: family -> (model block of the run config, the stage's growth): FFN + depth for GPT-2 (its heads
#: cannot grow without the hidden size: head_dim = n_embd / n_head), FFN + heads + depth for Llama
FAMILIES = {
    "gpt2": ({"family": "gpt2", "config": {"n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 64}},
             {"intermediate_size": 256, "num_layers": 3}),
    "llama": ({"family": "llama", "config": {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4,
                                             "num_key_value_heads": 2, "head_dim": 8, "num_hidden_layers": 2,
                                             "max_position_embeddings": 64}},
              {"intermediate_size": 128, "num_heads": 8, "num_kv_heads": 4, "num_layers": 3}),
}
GROW_AT, MASK_STEPS, MAX_STEPS = 6, 4, 12


def masked_cfg(out, tok, family, mask_steps=MASK_STEPS, **stage):
    model, grow_ = FAMILIES[family]
    return run_config(out, tok, model=model,
                      train={"max_steps": MAX_STEPS, "eval_interval": 6, "checkpoint_interval": 4},
                      stages=[{"name": "grown", "start_step": GROW_AT, "grow": grow_, "init": "random",
                               "mask_steps": mask_steps, **stage}])


def growth_event(out) -> dict:
    (g,) = [m for m in read_metrics(f"{out}/metrics.jsonl") if m["event"] == "growth"]
    return g


def losses(out):
    return [(m["step"], m["stage"], m["train_loss"]) for m in read_metrics(f"{out}/metrics.jsonl") if m["event"] == "train"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    tok = cached_tokenizer(tmp_path_factory, "causal_lm")
    out = {}
    for family in FAMILIES:
        path = tmp_path_factory.mktemp(f"masked_{family}") / "run"
        out[family] = (masked_cfg(path, tok, family), train(masked_cfg(path, tok, family)), path)
    return tok, out


@pytest.mark.parametrize("family", list(FAMILIES))
def test_masked_random_growth_keeps_the_loss(runs, family, tmp_path):
    tok, by_family = runs
    cfg, summary, out = by_family[family]
    g = growth_event(out)
    assert g["masked"] is True and g["exact"] is False  # the unmasked grown model is not the small one ...
    assert g["val_loss_after"] == pytest.approx(g["val_loss_before"], rel=1e-6)  # ... the masked one is
    # the same growth without masks changes the loss (so the check above can fail)
    plain = tmp_path / "plain"
    train(masked_cfg(plain, tok, family, mask_steps=0), stop_at_step=GROW_AT + 1)
    gp = growth_event(plain)
    assert gp["masked"] is False and abs(gp["val_loss_after"] - gp["val_loss_before"]) > 1e-4 * gp["val_loss_before"]
    # the final model is plain transformers (masks reached 1 inside the stage and are gone) ...
    model, info = T.AutoModelForCausalLM.from_pretrained(f"{out}/final", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    ffn = model.config.n_inner if family == "gpt2" else model.config.intermediate_size
    assert ffn == FAMILIES[family][1]["intermediate_size"]
    assert model.config.num_hidden_layers == 3
    # ... that computes the loss the run logged at the end
    last = [m for m in read_metrics(f"{out}/metrics.jsonl") if m["event"] == "eval"][-1]
    assert last["step"] == MAX_STEPS
    data = prepare_data(cfg, out)
    val = torch.utils.data.DataLoader(data.val_set(cfg.train.eval_batches * cfg.train.batch_size), batch_size=8)
    assert evaluate(model.eval(), val, causal=True) == pytest.approx(last["val_loss"], abs=1e-5)


def test_resume_mid_ramp_is_bit_identical(runs, tmp_path):
    tok, by_family = runs
    _, _, straight = by_family["llama"]
    out = tmp_path / "run"
    r = train(masked_cfg(out, tok, "llama"), stop_at_step=8)  # growth at 6, masks ramp until step 10
    ck = load_checkpoint(r["checkpoint"])
    spec = ck.state["masks"]
    assert ck.state["step"] == 8 and spec["start_step"] == GROW_AT and spec["steps"] == MASK_STEPS
    assert spec["layers"] and {k.rsplit(".", 1)[-1] for k in spec["units"]} == {"o_proj", "down_proj"}
    # the mid-ramp checkpoint's model is a plain HF checkpoint too
    _, info = T.AutoModelForCausalLM.from_pretrained(r["checkpoint"] + "/model", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    train(masked_cfg(out, tok, "llama"), resume=True)
    assert losses(out) == losses(straight)  # exact float equality, every step


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_masks_keep_logits_whatever_the_new_weights(family):
    """m = 0: the grown model's logits are the small model's; 0 < m < 1: they move; m = 1: hooks gone."""
    small = tiny_model(family)
    grow_ = dict(FAMILIES[family][1])
    grow_["intermediate_size"] = 2 * (small.config.n_inner or 128) if family == "gpt2" else 128
    res = grow(small, init="random", seed=1, **grow_)
    ids = torch.randint(0, 101, (2, 11), generator=torch.Generator().manual_seed(0))
    grown = res.model.eval()
    spec = mask_spec(grown, res.param_maps, start_step=5, steps=4)
    with torch.no_grad():
        ref, unmasked = small(ids).logits, grown(ids).logits
        masks = GrowthMasks(grown, spec, step=5)
        at0 = grown(ids).logits
        masks.set_step(7)
        half = grown(ids).logits
        masks.set_step(9)
        at1 = grown(ids).logits
    scale = ref.abs().max()
    assert (unmasked - ref).abs().max() > 1e-2 * scale
    assert (at0 - ref).abs().max() <= 1e-5 * scale
    assert (half - ref).abs().max() > 1e-3 * scale
    assert not masks.active and torch.equal(at1, unmasked)
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in grown.modules())


def test_mask_and_fade_together_are_refused(tmp_path):
    tok = str(tmp_path)  # never read: the config is refused first
    with pytest.raises(ProgtrainConfigError, match="mask_steps .* or fade_in_steps"):
        masked_cfg(tmp_path / "r", tok, "gpt2", fade_in_steps=2)
    with pytest.raises(ProgtrainConfigError, match="mask_steps=7 runs past step 12"):
        masked_cfg(tmp_path / "r", tok, "gpt2", mask_steps=7)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "zero2"])
def test_masked_growth_two_processes(mode, tmp_path_factory):
    tok = cached_tokenizer(tmp_path_factory, "causal_lm")
    out = tmp_path_factory.mktemp(f"masked_{mode}")
    cfg = masked_cfg(out / "run", tok, "llama").to_dict()
    cfg["train"].update(checkpoint_interval=0, eval_interval=6, max_steps=10, mixed_precision="no")
    (out / "run.yaml").write_text(yaml.safe_dump(cfg))
    run_launch(mode, REPO / "recipes" / "pretrain_gpt.py", ["--config", str(out / "run.yaml")], out / "log.txt")
    info = json.loads((out / "run" / "run_info.json").read_text())
    assert info["world_size"] == 2 and info["engine"] == mode
    g = growth_event(out / "run")
    assert g["masked"] is True and g["val_loss_after"] == pytest.approx(g["val_loss_before"], rel=1e-6)
    _, li = T.AutoModelForCausalLM.from_pretrained(out / "run" / "final", output_loading_info=True)
    assert not li["missing_keys"] and not li["unexpected_keys"]
