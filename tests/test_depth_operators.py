"""Depth from trained layers (issue 11.1): where each grown layer comes from (``layer_placement``:
interleave, top, indices, stack, middle; or explicit ``layer_sources``) and how a new layer is made
(``depth_init``: copy_zero_out, copy, zero_out), through ``grow()``, the CLI and a run config."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
import torch
import transformers as T

from progtrain import ProgtrainConfigError, grow
from progtrain.arch import get_adapter
from progtrain.arch.base import BLOCK_OUTPUT_ROLES
from progtrain.cli import main
from progtrain.growth import GrowthSpec, plan_growth
from progtrain.train.config import from_dict, stage_plans
from progtrain.verify import measure_deviation
from tiny_models import FAMILIES, perturb, tiny_model

PRE_NORM = [f for f in FAMILIES if get_adapter(tiny_model(f)).pre_norm]
REL_TOL = 1e-5


def deep_model(family: str, layers: int, seed: int = 1, **config):
    """A perturbed tiny model of ``family`` with ``layers`` layers (distinct random layers)."""
    base = tiny_model(family)
    d = base.config.to_dict()
    d.pop("layer_types", None)
    d[get_adapter(base).config_keys["layers"]] = layers
    d.update(config)
    torch.manual_seed(seed)
    return perturb(type(base)(type(base.config).from_dict(d))).eval()


def blocks(model):
    """The model's list of blocks."""
    mod = model.base_model
    for part in get_adapter(model).layers_path.split("."):
        mod = getattr(mod, part)
    return mod


def max_rel_dev(a, b, seed: int = 0) -> float:
    """max |delta logits| / max |logits| of two causal LMs on random tokens (fp32, eval)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, a.config.vocab_size, (3, 12), generator=g)
    with torch.no_grad():
        la, lb = a(ids).logits, b(ids).logits
    return float((la - lb).abs().max() / la.abs().max())


def check_layers(src, res, sources: list[int], how: str) -> None:
    """Every grown layer's tensors against its source layer: trained layers and ``copy`` copies are
    equal; ``copy_zero_out`` copies are equal except the block outputs (o, down and biases), which are
    zero; ``zero_out`` layers have zero outputs and fresh (different) weights elsewhere."""
    adapter = get_adapter(src)
    old, new = blocks(src), blocks(res.model)
    assert len(new) == len(sources)
    for i, s in enumerate(sources):
        for name, p in new[i].named_parameters():
            q = dict(old[s].named_parameters())[name]
            role = adapter.layer_params[name].role
            is_new = res.maps.layer_new[i]
            if not is_new or how == "copy":
                assert torch.equal(p, q), (i, name)
            elif role in BLOCK_OUTPUT_ROLES:
                assert not p.any(), (i, name)
            elif how == "copy_zero_out":
                assert torch.equal(p, q), (i, name)
            elif p.dim() > 1:  # zero_out: fresh matrices
                assert not torch.equal(p, q), (i, name)


PLACEMENTS = [
    # (source layers, target layers, placement, expected sources, expected new flags)
    (2, 4, "interleave", [0, 0, 1, 1], [False, True, False, True]),
    (2, 3, "top", [0, 1, 1], [False, False, True]),
    (2, 4, [0, 3], [0, 0, 1, 1], [True, False, False, True]),
    (2, 4, "stack", [0, 1, 0, 1], [False, False, True, True]),
    (3, 8, "stack", [0, 1, 2, 0, 1, 2, 0, 1], [False] * 3 + [True] * 5),
    (4, 6, "middle", [0, 1, 2, 1, 2, 3], [False, False, False, True, True, False]),
    (4, 5, "middle", [0, 1, 1, 2, 3], [False, False, True, False, False]),
    (2, 6, "middle", [0, 1, 0, 1, 0, 1], [False, False, True, True, True, True]),
]
PLACEMENT_IDS = [f"{a}to{b}-{p if isinstance(p, str) else 'idx'}" for a, b, p, _, _ in PLACEMENTS]


@pytest.mark.parametrize("family", PRE_NORM)
@pytest.mark.parametrize("old,new,placement,sources,is_new", PLACEMENTS, ids=PLACEMENT_IDS)
@pytest.mark.parametrize("how", ["copy_zero_out", "zero_out"])
def test_exact_depth_growth(family, old, new, placement, sources, is_new, how):
    """copy_zero_out / zero_out are exact in pre-norm families for every placement; each layer comes
    from the documented source; greedy generation with the KV cache is unchanged."""
    src = deep_model(family, old)
    res = grow(src, num_layers=new, layer_placement=placement, depth_init=how)
    assert res.maps.layer_src == sources and res.maps.layer_new == is_new
    assert res.record["layer_sources"] == sources and res.record["depth_init"] == how
    dev = max_rel_dev(src, res.model)
    assert dev <= REL_TOL, dev
    assert res.exact is True and res.deviation["rel"] <= REL_TOL
    check_layers(src, res, sources, how)
    # attention layer_idx follows the position (KV cache): greedy tokens are the small model's
    ids = torch.randint(0, src.config.vocab_size, (1, 5), generator=torch.Generator().manual_seed(3))
    kw = dict(max_new_tokens=8, do_sample=False, use_cache=True, pad_token_id=0)
    assert torch.equal(src.generate(ids, **kw), res.model.generate(ids, **kw))


@pytest.mark.parametrize("family", PRE_NORM)
def test_stack_copy_repeats_the_trained_stack(family):
    """stack + copy: layers i and i + L of the grown model are trained layer i, tensor for tensor; the
    growth is labelled approximate with the deviation measured."""
    src = deep_model(family, 2)
    res = grow(src, num_layers=4, layer_placement="stack", depth_init="copy")
    check_layers(src, res, [0, 1, 0, 1], "copy")
    assert res.exact is False
    assert res.deviation["rel"] == pytest.approx(measure_deviation(src, res.model, seed=0)["rel"], rel=1e-6)
    assert max_rel_dev(src, res.model) > 100 * REL_TOL
    assert any("depth_init=copy" in n for n in res.notes)


def test_copies_score_attention_as_their_source():
    """GPT-2 scale_attn_by_inverse_layer_idx (block i scales q.k by 1/(i+1)): a copy of trained layer i
    placed at i + L computes, on the same input, what layer i computes."""
    src = deep_model("gpt2", 2, scale_attn_by_inverse_layer_idx=True)
    res = grow(src, num_layers=4, layer_placement="stack", depth_init="copy", symmetry_noise=0.0)
    x = torch.randn(2, 7, src.config.n_embd, generator=torch.Generator().manual_seed(0))
    pos = torch.arange(7)[None].expand(2, 7)
    with torch.no_grad():
        for i in range(2):
            want = blocks(src)[i](x, position_ids=pos)
            got = blocks(res.model)[i + 2](x, position_ids=pos)
            want, got = (want[0], got[0]) if isinstance(want, tuple) else (want, got)
            assert torch.allclose(got, want, atol=1e-6, rtol=1e-5)
    # the stacked copy's query rows carry the (i+1+L)/(i+1) factor
    q_old = blocks(src)[0].attn.c_attn.weight[:, :32]
    q_new = blocks(res.model)[2].attn.c_attn.weight[:, :32]
    assert torch.allclose(q_new, q_old * 3.0)


def test_per_layer_config_follows_sources(tmp_path):
    """Qwen2 with a sliding window from layer 1: stack gives layer_types [full, sliding, full, sliding];
    max_window_layers is the leading run of full layers; exact; saves and reloads."""
    cfg = T.Qwen2Config(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                        num_hidden_layers=2, vocab_size=101, use_sliding_window=True, sliding_window=4,
                        max_window_layers=1)
    torch.manual_seed(0)
    src = perturb(T.Qwen2ForCausalLM(cfg)).eval()
    res = grow(src, num_layers=4, layer_placement="stack")
    assert res.model.config.layer_types == ["full_attention", "sliding_attention"] * 2
    assert res.model.config.max_window_layers == 1
    assert max_rel_dev(src, res.model) <= REL_TOL  # 12 tokens > the window of 4: the window matters
    res.model.save_pretrained(tmp_path)
    back = T.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert back.config.layer_types == res.model.config.layer_types
    assert max_rel_dev(src, back) <= REL_TOL


def test_threshold_without_per_layer_list_is_refused():
    """A threshold key that no per-layer list backs cannot express a stacked order: one clear error."""
    cfg = T.Qwen2Config(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                        num_hidden_layers=2, vocab_size=101, use_sliding_window=True, sliding_window=4,
                        max_window_layers=1)
    adapter = get_adapter(cfg)
    cfg.layer_types = None  # a config whose model reads the threshold itself
    sizes = dataclasses.replace(adapter.read_sizes(cfg), layers=4)
    with pytest.raises(ProgtrainConfigError, match="max_window_layers=1 cannot describe"):
        adapter.write_config(cfg, sizes, layer_sources=[0, 1, 0, 1])
    assert adapter.write_config(cfg, sizes, layer_sources=[0, 0, 1, 1]).max_window_layers == 2


@pytest.mark.parametrize("family", PRE_NORM)
def test_layer_sources_give_the_listed_copies(family):
    src = deep_model(family, 3)
    res = grow(src, layer_sources=[0, 1, 1, 2, 0, "new"])
    assert res.target_sizes.layers == 6
    assert res.maps.layer_new == [False, False, True, False, True, True]
    assert res.record["layer_init"] == [None, None, "copy_zero_out", None, "copy_zero_out", "zero_out"]
    assert max_rel_dev(src, res.model) <= REL_TOL
    for i, s in enumerate([0, 1, 1, 2, 0]):  # the "new" layer (5) is checked as zero_out below
        check = dict(blocks(src)[s].named_parameters())
        for name, p in blocks(res.model)[i].named_parameters():
            role = get_adapter(src).layer_params[name].role
            if res.maps.layer_new[i] and role in BLOCK_OUTPUT_ROLES:
                assert not p.any()
            else:
                assert torch.equal(p, check[name]), (i, name)
    for name, p in blocks(res.model)[5].named_parameters():
        if get_adapter(src).layer_params[name].role in BLOCK_OUTPUT_ROLES:
            assert not p.any()


@pytest.mark.parametrize(
    "kw,needle",
    [
        (dict(num_layers=5, layer_sources=[0, 1, 1, 1]), "has 4 entries but num_layers=5"),
        (dict(layer_sources=[0, 1, 2, 1]), "index 2 is out of range"),
        (dict(layer_sources=[0, 0, 0]), "trained layer(s) [1] are missing"),
        (dict(layer_sources=[1, 0, 1]), "first occur in the order [1, 0]"),
        (dict(layer_sources=[0, "x", 1]), "invalid layer_sources entry 'x'"),
        (dict(layer_sources=[0, 1, 1], layer_placement="top"), "not both"),
        (dict(num_layers=4, depth_init="clone"), "unknown depth_init 'clone'"),
        (dict(num_layers=4, layer_placement="bottom"), "invalid layer_placement 'bottom'"),
        (dict(layer_sources=[0, 1]), "nothing to grow"),
    ],
)
def test_bad_depth_requests_one_clear_error(kw, needle):
    model = tiny_model("gpt2")
    with pytest.raises(ProgtrainConfigError) as e:
        grow(model, **kw)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_post_norm_copy_zero_out_is_approximate_and_points_to_fade_in():
    src = tiny_model("bert")
    res = grow(src, num_layers=4, layer_placement="stack")
    assert res.exact is False
    note = " ".join(res.notes)
    assert "copy_zero_out is not the identity" in note and "fade_in_steps" in note


def test_random_strategy_default_draws_new_layers_whole():
    """Without a function-preserving strategy the default depth_init lets the strategy draw the layer."""
    src = tiny_model("llama")
    res = grow(src, num_layers=4, init="random", verify=False)
    assert res.record["depth_init"] == "init"
    assert blocks(res.model)[1].self_attn.o_proj.weight.any()  # drawn, not zero
    res = grow(src, num_layers=4, init="random", depth_init="copy_zero_out")
    assert res.exact is True


# ---------------------------------------------------------------------- CLI
def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_layer_sources(tmp_path, capsys):
    src_dir = tmp_path / "src"
    src = deep_model("llama", 3)
    src.save_pretrained(src_dir)
    code, text, err = run(capsys, "grow", src_dir, tmp_path / "out", "--layer-sources", "0,1,1,2,2")
    assert code == 0, err
    grown = T.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert grown.config.num_hidden_layers == 5
    for i, s in enumerate([0, 1, 1, 2, 2]):
        for name, p in blocks(grown)[i].named_parameters():
            if i in (2, 4) and get_adapter(grown).layer_params[name].role in BLOCK_OUTPUT_ROLES:
                assert not p.any()
            else:
                assert torch.equal(p, dict(blocks(src)[s].named_parameters())[name]), (i, name)
    assert max_rel_dev(src, grown) <= REL_TOL
    hist = json.loads((tmp_path / "out" / "progtrain_growth.json").read_text())
    rec = hist[-1] if isinstance(hist, list) else hist["history"][-1]
    assert rec["layer_sources"] == [0, 1, 1, 2, 2] and rec["new_layer_positions"] == [2, 4]


def test_cli_copy_prints_the_measured_deviation_and_never_exact(tmp_path, capsys):
    src_dir = tmp_path / "src"
    deep_model("gpt2", 2).save_pretrained(src_dir)
    out = tmp_path / "out"
    code, text, err = run(capsys, "grow", src_dir, out, "--num-layers", "4", "--layer-placement", "stack",
                          "--depth-init", "copy")
    assert code == 0, err
    m = re.search(r"max \|delta logits\| = ([0-9.e+-]+)\s+\(([0-9.e+-]+) of max", text)
    assert m, text
    a = T.AutoModelForCausalLM.from_pretrained(src_dir).eval()
    b = T.AutoModelForCausalLM.from_pretrained(out).eval()
    measured = measure_deviation(a, b, seed=0)
    assert float(m[1]) == pytest.approx(measured["max_abs"], rel=1e-3)
    assert float(m[2]) == pytest.approx(measured["rel"], rel=1e-3)
    assert measured["rel"] > REL_TOL
    assert not re.search(r"\bexact\b", text, flags=re.I), text
    assert "APPROXIMATE" in text and "depth_init=copy" in text


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--layer-sources", "0,1,5"], "index 5 is out of range"),
        (["--layer-sources", "0,0,0"], "are missing"),
        (["--num-layers", "4", "--layer-sources", "0,1,1"], "has 3 entries but num_layers=4"),
        (["--layer-sources", "0,1,1", "--layer-placement", "stack"], "not both"),
    ],
)
def test_cli_bad_layer_sources_exit_2(tmp_path, capsys, args, needle):
    src_dir = tmp_path / "src"
    tiny_model("gpt2").save_pretrained(src_dir)
    code, _, err = run(capsys, "grow", src_dir, tmp_path / "out", *args)
    last = err.strip().splitlines()[-1]
    assert code == 2 and last.startswith("progtrain grow: error:") and needle in last, err
    assert not (tmp_path / "out").exists()


def test_cli_bad_depth_init_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["grow", str(tmp_path), str(tmp_path / "o"), "--num-layers", "4", "--depth-init", "clone"])
    assert e.value.code == 2 and "invalid choice: 'clone'" in capsys.readouterr().err


# ---------------------------------------------------------------------- run config
def _run_config(tmp_path, grow_block):
    return {
        "output_dir": str(tmp_path / "run"),
        "model": {"family": "llama", "task": "causal_lm",
                  "config": {"hidden_size": 32, "num_attention_heads": 4, "num_key_value_heads": 2,
                             "intermediate_size": 64, "num_hidden_layers": 2}},
        "data": {"vocab_size": 256, "seq_len": 16},
        "train": {"max_steps": 20, "batch_size": 2},
        "stages": [{"name": "deep", "start_step": 10, "grow": grow_block}],
    }


@pytest.mark.parametrize(
    "block,sources,inits",
    [
        ({"num_layers": 4, "layer_placement": "stack", "depth_init": "copy"}, [0, 1, 0, 1],
         [None, None, "copy", "copy"]),
        ({"num_layers": 6, "layer_placement": "middle"}, [0, 1, 0, 1, 0, 1], [None, None] + ["copy_zero_out"] * 4),
        ({"layer_sources": [0, 1, 1, "new"], "depth_init": "zero_out"}, [0, 1, 1, 1],
         [None, None, "zero_out", "zero_out"]),
    ],
)
def test_run_config_stage_accepts_depth_keys(tmp_path, block, sources, inits):
    cfg = from_dict(_run_config(tmp_path, block))
    assert isinstance(cfg.stages[0].grow, GrowthSpec)
    _, plans = stage_plans(cfg)
    assert list(plans[0].layer_sources) == sources and list(plans[0].layer_init) == inits


@pytest.mark.parametrize(
    "block,needle",
    [
        ({"layer_sources": [0, 1, 3]}, r"stages\[0\] \(deep\): layer_sources 0,1,3: index 3 is out of range"),
        ({"num_layers": 4, "depth_init": "clone"}, r"stages\[0\] \(deep\): unknown depth_init 'clone'"),
    ],
)
def test_run_config_bad_depth_keys(tmp_path, block, needle):
    with pytest.raises(ProgtrainConfigError, match=needle):
        from_dict(_run_config(tmp_path, block))


def test_plan_is_made_once_and_reused(monkeypatch):
    """grow(model, spec) plans once; grow(model, plan) uses the plan as it is."""
    import progtrain.growth.core as core

    model = tiny_model("gpt2")
    plan = plan_growth(model.config, GrowthSpec(num_layers=4, layer_placement="stack"))
    calls = []
    real = core.plan_growth
    monkeypatch.setattr(core, "plan_growth", lambda *a, **k: calls.append(1) or real(*a, **k))
    res = grow(model, plan)
    assert calls == [] and res.maps.layer_src == [0, 1, 0, 1]
    grow(model, num_layers=3, verify=False)
    assert calls == [1]
    with pytest.raises(ProgtrainConfigError, match="pass it alone"):
        grow(model, plan, init="random")
    with pytest.raises(ProgtrainConfigError, match="made for a gpt2 model"):
        grow(tiny_model("llama"), plan)


def test_grow_flags_are_the_spec_fields(capsys):
    """Every GrowthSpec field is a `progtrain grow` flag whose help is the field's documentation."""
    from progtrain.cli import build_parser

    grow_parser = build_parser()._subparsers._group_actions[0].choices["grow"]
    actions = {a.dest: a for a in grow_parser._actions}
    for f in dataclasses.fields(GrowthSpec):
        a = actions[f.name]
        assert a.option_strings == ["--" + f.name.replace("_", "-")]
        assert f.metadata["help"] and a.help.startswith(f.metadata["help"])
        assert a.default == f.default
    with pytest.raises(SystemExit) as e:
        main(["grow", "a", "b", "--layer-placement", "bottom"])
    assert e.value.code == 2 and "invalid layer_placement 'bottom': use interleave, top, stack" in capsys.readouterr().err
