"""Stage option ``moments`` (:func:`progtrain.train.surgery.grow_moments`): ``split`` keeps the
training dynamics of an exact x2 width growth, ``carry`` copies moments unscaled, ``reset`` zeroes
new and duplicated elements only; the training loop uses the stage's choice."""

from __future__ import annotations

import copy
import shutil

import pytest
import torch

from progtrain import grow
from progtrain.errors import ProgtrainConfigError
from progtrain.io import load_model
from progtrain.train.checkpoint import list_checkpoints, load_checkpoint
from progtrain.train.engine import train
from progtrain.train.surgery import MOMENT_KEYS, element_sources, grow_moments, update_scales
from test_surgery import _adam_state, _batches, _loss, _one_step_delta, _trained
from test_train_single import cached_tokenizer, run_config

LR = 1e-3
X2 = dict(hidden_size=64, num_heads=8, intermediate_size=256)  # x2 width of test_surgery's GPT-2 (32, 4 heads, 128)


@pytest.fixture(scope="module")
def small():
    model, opt = _trained(steps=3)
    return model, _adam_state(model, opt)


def _updates(model, moments, step, ids):
    """Each parameter's change in one AdamW step on ids (weight decay 0) from the given moments."""
    model = copy.deepcopy(model)
    params = dict(model.named_parameters())
    opt = torch.optim.AdamW(params.values(), lr=LR, weight_decay=0.0, betas=(0.9, 0.95))
    model(input_ids=ids, labels=ids).loss.backward()
    for n, p in params.items():
        opt.state[p] = {"step": torch.tensor(float(step)), **{k: t.clone() for k, t in moments[n].items()}}
    old = {n: p.detach().clone() for n, p in params.items()}
    opt.step()
    return {n: p.detach() - old[n] for n, p in params.items()}


@pytest.mark.parametrize("noise", [0.0, 1e-2], ids=["no_noise", "default_noise"])
def test_split_first_step_changes_loss_as_small_model(small, noise):
    model, moments = small
    ids, eval_ids = _batches(2, seed=7)
    d_small = _one_step_delta(model, moments, 3, ids, eval_ids, lr=LR)
    res = grow(model, **X2, symmetry_noise=noise, verify=False)
    assert _loss(res.model, eval_ids) == pytest.approx(_loss(model, eval_ids), rel=1e-6)  # exact growth
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    scales = update_scales(res.param_maps, shapes, born_scale=0.0)  # match_dynamics: copies move by s * u
    rel = {}
    for mode in ("split", "carry", "reset"):
        for with_scales in (True, False):
            d = _one_step_delta(res.model, grow_moments(moments, res.param_maps, mode=mode), 3, ids, eval_ids,
                                scales if with_scales else None, lr=LR)
            rel[mode, with_scales] = abs(d - d_small) / abs(d_small)
    print("\nrelative difference of the first post-growth step's loss change from the small model's: "
          + ", ".join(f"{m}{' + match_dynamics' if s else ''} {r:.2e}" for (m, s), r in rel.items()))
    assert rel["split", True] <= 1e-4
    # moments alone cannot keep a split reader on the small model's path (docstring of surgery.py):
    # without the update scales the readers' copies move k times as far
    assert rel["split", False] > 0.3
    # the other mappings are not the small model's dynamics even with the update scales
    assert rel["carry", True] > 1e-2 and rel["reset", True] > 1e-2


def test_split_gives_each_copy_the_small_models_update(small):
    """Without symmetry noise every copy's Adam update equals its source's update in the small model
    (the split factors' promise); with the default noise the writers' copies are off, as derived."""
    model, moments = small
    ids, _ = _batches(2, seed=7)
    u_small = _updates(model, moments, 3, ids)
    worst = {}
    for noise in (0.0, 1e-2):
        res = grow(model, **X2, symmetry_noise=noise, verify=False)
        for mode in ("split", "carry"):
            u = _updates(res.model, grow_moments(moments, res.param_maps, mode=mode), 3, ids)
            dev = 0.0
            for n, pm in res.param_maps.items():
                if n.endswith("c_attn.bias"):  # key biases: zero gradient in exact arithmetic, rounding only
                    continue
                src, _, _ = element_sources(pm, tuple(moments[pm.old_name]["exp_avg"].shape))
                old = src >= 0
                if old.any():
                    ref = u_small[pm.old_name].flatten()[src.clamp(min=0)]
                    dev = max(dev, float((u[n] - ref).abs()[old].max()) / LR)
            worst[noise, mode] = dev
    print("\nmax |copy update - source update| / lr: "
          + ", ".join(f"noise {k[0]:g} {k[1]} {v:.2e}" for k, v in worst.items()))
    assert worst[0.0, "split"] <= 1e-3
    assert worst[0.0, "carry"] > 0.1  # unscaled v: the tiled writers' copies take too small a step
    assert worst[1e-2, "split"] > 10 * worst[0.0, "split"]  # the noise's +-e_j in the writers' gradients


def test_reset_zeroes_new_and_duplicated_elements_only(small):
    model, moments = small
    res = grow(model, **X2, num_layers=3, verify=False)
    new = grow_moments(moments, res.param_maps, mode="reset")
    kept = zeroed = 0
    for n, pm in res.param_maps.items():
        old_m = moments[pm.old_name]
        src, _, k = element_sources(pm, tuple(old_m["exp_avg"].shape))
        fresh = (src < 0) | (k > 1)
        for key in MOMENT_KEYS:
            assert not bool(new[n][key][fresh].any()), (n, key)
            expect = old_m[key].flatten()[src.clamp(min=0)]
            assert torch.equal(new[n][key][~fresh], expect[~fresh]), (n, key)  # unchanged, bit for bit
        kept += int((~fresh).sum())
        zeroed += int(fresh.sum())
    assert kept > 0 and zeroed > 0


def test_carry_copies_moments_unscaled(small):
    model, moments = small
    res = grow(model, **X2, verify=False)
    new = grow_moments(moments, res.param_maps, mode="carry")
    assert grow_moments(moments, res.param_maps, factors=False)["transformer.wte.weight"]["exp_avg"].equal(
        new["transformer.wte.weight"]["exp_avg"])  # the older spelling
    for n, pm in res.param_maps.items():
        src, _, _ = element_sources(pm, tuple(moments[pm.old_name]["exp_avg"].shape))
        for key in MOMENT_KEYS:
            expect = moments[pm.old_name][key].flatten()[src.clamp(min=0)].masked_fill(src < 0, 0.0)
            assert torch.equal(new[n][key], expect), (n, key)
    with pytest.raises(ValueError, match="unknown moments mode 'keep'"):
        grow_moments(moments, res.param_maps, mode="keep")


@pytest.mark.parametrize("mode", ["reset", "carry"])
def test_run_uses_the_stage_moments_option(mode, tmp_path_factory):
    """The grown state a run checkpoints at the growth holds the chosen mapping of the moments it had."""
    tok = cached_tokenizer(tmp_path_factory, "causal_lm")
    out = tmp_path_factory.mktemp(f"moments_{mode}") / "run"
    stage = {"name": "wide", "start_step": 4, "grow": {"hidden_size": 64, "num_heads": 8, "num_layers": 3}, "moments": mode}
    cfg = lambda: run_config(out, tok, train={"max_steps": 8, "checkpoint_interval": 0}, stages=[stage])  # noqa: E731
    before = train(cfg(), stop_at_step=4)["checkpoint"]  # the state just before the growth
    pre = shutil.copytree(before, out.parent / "pre")
    train(cfg(), resume=True, stop_at_step=5)
    (boundary,) = [p for p in list_checkpoints(out) if load_checkpoint(p).state["boundary"]]
    grown = load_checkpoint(boundary).moments
    res = grow(load_model(str(pre / "model"), dtype="float32"), stage["grow"], verify=False)
    expect = grow_moments(load_checkpoint(pre).moments, res.param_maps, mode=mode)
    assert sorted(grown) == sorted(expect)
    for n in expect:
        for key in MOMENT_KEYS:
            assert torch.equal(grown[n][key], expect[n][key]), (n, key)


def test_bad_moments_option_is_refused(tmp_path):
    with pytest.raises(ProgtrainConfigError, match="moments='keep' is not one of carry, split, reset"):
        run_config(tmp_path, str(tmp_path), stages=[{"name": "w", "start_step": 5, "grow": {"num_layers": 3},
                                                    "moments": "keep"}])


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert"])
def test_blockwise_surgery_equals_the_per_element_definition(family, monkeypatch):
    """grow_moments maps a few rows at a time from the axis plans (bounded temporaries: ~1 GB of float64
    index tensors for a 50257 x 256 embedding before); each grown element still gets exactly what
    element_sources defines: its source's moments times c = 1/(k s) (split) or 1 (carry), 0 when born
    (and, for reset, when copied k > 1 times), bit for bit, in every mode and across block edges."""
    from tiny_models import tiny_model

    import progtrain.train.surgery as surgery

    monkeypatch.setattr(surgery, "_CHUNK_ELEMENTS", 37)  # blocks that cut rows of every matrix
    model = tiny_model(family)
    res = grow(model, hidden_size=128, num_heads=8, num_layers=3, verify=False)
    g = torch.Generator().manual_seed(0)
    moments = {n: {"exp_avg": torch.randn(p.shape, generator=g), "exp_avg_sq": torch.rand(p.shape, generator=g)}
               for n, p in model.named_parameters()}
    for mode in ("carry", "split", "reset"):
        new = grow_moments(moments, res.param_maps, mode=mode)
        for name, pm in res.param_maps.items():
            if pm.new_layer:
                assert all(not new[name][k].any() for k in MOMENT_KEYS)
                continue
            old = moments[pm.old_name]
            src, s, k = element_sources(pm, tuple(old["exp_avg"].shape))
            born = (src < 0) | ((k > 1) if mode == "reset" else False)
            c = surgery._split_factor(s, k) if mode == "split" else torch.ones(src.shape, dtype=torch.float64)
            for key, power in (("exp_avg", 1), ("exp_avg_sq", 2)):
                want = old[key].flatten()[src.clamp(min=0)].double() * c
                want = (want * c if power == 2 else want).masked_fill(born, 0.0).float()
                assert torch.equal(new[name][key], want), (family, mode, name, key)
