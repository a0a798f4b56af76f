"""The grown model's config is built and validated with the family's config class before any tensor
is touched (issue 13, item 4), and every config field that depends on the number of layers, heads
or the width is rebuilt consistently with the grown model."""

import importlib
import re

import pytest
import torch
import transformers as T
import yaml
from accelerate import init_empty_weights

import progtrain.io as pio
from progtrain import grow
from progtrain.arch import get_adapter
from progtrain.cli import main
from progtrain.errors import ProgtrainConfigError
from progtrain.growth.spec import GrowthSpec
from progtrain.train.config import from_dict
from tiny_models import FAMILIES, LLAMA_LIKE_TINY, TABLE, perturb, tiny_model

core = importlib.import_module("progtrain.growth.core")  # the module (progtrain.growth.grow is the function)

# the input of the bug report: a Llama with head_dim its own key (64 wide, 4 heads, 2 kv-heads, head_dim 16)
# grown to 80 wide, 6 heads, 3 kv-heads: the sizes resolve, but LlamaConfig requires hidden % heads == 0
BAD_GROWTH = {"hidden_size": 80, "num_heads": 6, "num_kv_heads": 3}


def llama_head_dim_kept(**kw):
    cfg = T.LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                        intermediate_size=128, num_hidden_layers=2, vocab_size=101, **kw)
    torch.manual_seed(0)
    return perturb(T.LlamaForCausalLM(cfg)).eval()


@pytest.fixture
def llama_dir(tmp_path):
    d = tmp_path / "llama_src"
    llama_head_dim_kept().save_pretrained(d)
    return d


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def _no_load(*a, **k):
    raise AssertionError("weights were loaded before the target config was validated")


def _suggested_specs(msg: str) -> list[dict]:
    """The growth sizes the error message proposes as the fix."""
    specs = []
    m = re.search(r"num_heads=(\d+) with num_kv_heads=(\d+)", msg)
    if m:
        specs.append({"hidden_size": BAD_GROWTH["hidden_size"], "num_heads": int(m[1]), "num_kv_heads": int(m[2])})
    m = re.search(r"hidden_size=(\d+)", msg)
    if m:
        specs.append({**BAD_GROWTH, "hidden_size": int(m[1])})
    return specs


# ---------------------------------------------------------------------- the reported input
def test_cli_refuses_invalid_target_config_before_loading_weights(llama_dir, tmp_path, capsys, monkeypatch):
    calls = []
    monkeypatch.setattr(pio, "load_model", lambda *a, **k: calls.append(a) or _no_load())
    out = tmp_path / "grown"
    code, text, err = run(capsys, "grow", llama_dir, out, "--hidden-size", 80, "--num-heads", 6, "--num-kv-heads", 3)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "LlamaConfig" in lines[0] and "hidden size (80)" in lines[0] and "attention heads (6)" in lines[0]
    assert "Traceback" not in err and text == ""
    assert calls == []  # refused before the weights were loaded
    assert not out.exists()


def test_cli_refuses_even_with_corrupt_weights(llama_dir, tmp_path, capsys):
    (llama_dir / "model.safetensors").write_bytes(b"not a safetensors file")
    out = tmp_path / "grown"
    code, _, err = run(capsys, "grow", llama_dir, out, "--hidden-size", 80, "--num-heads", 6, "--num-kv-heads", 3)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "validate_architecture" in err
    assert not out.exists()


def test_suggested_fix_is_valid_and_saves(llama_dir, tmp_path, capsys):
    """The sizes the message proposes grow, save and reload (the fix is real, not a guess)."""
    code, _, err = run(capsys, "grow", llama_dir, tmp_path / "x", "--hidden-size", 80, "--num-heads", 6,
                       "--num-kv-heads", 3)
    specs = _suggested_specs(err)
    assert code == 2 and len(specs) == 2, err
    for i, spec in enumerate(specs):
        out = tmp_path / f"fixed{i}"
        code, text, err2 = run(capsys, "grow", llama_dir, out, "--hidden-size", spec["hidden_size"],
                               "--num-heads", spec["num_heads"], "--num-kv-heads", spec["num_kv_heads"])
        assert code == 0, err2
        cfg = T.AutoConfig.from_pretrained(out)
        assert (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (
            spec["hidden_size"], spec["num_heads"], spec["num_kv_heads"], 16)


def test_grow_refuses_before_any_tensor(monkeypatch):
    model = llama_head_dim_kept()

    def reached(*a, **k):
        raise AssertionError("growth work started before the target config was validated")

    monkeypatch.setattr(core, "iter_params", reached)
    monkeypatch.setattr(core.SpaceMaps, "build", reached)
    with pytest.raises(ProgtrainConfigError, match=r"LlamaConfig.*hidden size \(80\)"):
        grow(model, **BAD_GROWTH)
    with pytest.raises(ProgtrainConfigError, match="LlamaConfig"):
        GrowthSpec(**BAD_GROWTH).resolve_config(model.config, get_adapter(model))


def _run_config(tmp_path, model_config, grow_spec):
    return {
        "output_dir": str(tmp_path / "run"),
        "model": {"family": "llama", "task": "causal_lm", "config": model_config},
        "data": {"vocab_size": 256, "seq_len": 16},
        "train": {"max_steps": 20, "batch_size": 2},
        "stages": [{"name": "wide", "start_step": 10, "grow": grow_spec}],
    }


LLAMA_RUN_MODEL = {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
                   "intermediate_size": 128, "num_hidden_layers": 2}


def test_run_config_refuses_stage_at_validation(tmp_path, capsys, monkeypatch):
    import progtrain.train.engine as engine

    d = _run_config(tmp_path, LLAMA_RUN_MODEL, BAD_GROWTH)
    with pytest.raises(ProgtrainConfigError, match=r"stages\[0\] \(wide\).*LlamaConfig"):
        from_dict(d)
    monkeypatch.setattr(engine, "train", lambda *a, **k: _no_load())
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(d))
    code, _, err = run(capsys, "train", path)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "stages[0] (wide)" in err
    assert not (tmp_path / "run").exists()
    # the later stage is checked against the config the earlier stage grows into
    d["stages"] = [{"name": "deep", "start_step": 5, "grow": {"num_layers": 3}},
                   {"name": "wide", "start_step": 10, "grow": BAD_GROWTH}]
    with pytest.raises(ProgtrainConfigError, match=r"stages\[1\] \(wide\).*LlamaConfig"):
        from_dict(d)
    d["stages"][1]["grow"] = {"hidden_size": 96, "num_heads": 6, "num_kv_heads": 3}
    from_dict(d)  # valid


def test_invalid_initial_config_is_one_line(tmp_path, capsys):
    """An initial model config the family's class rejects: one line, not a strict-dataclass traceback."""
    d = _run_config(tmp_path, dict(LLAMA_RUN_MODEL, hidden_size=66), {"num_layers": 3})
    with pytest.raises(ProgtrainConfigError, match=r"model.config: validate_architecture: The hidden size \(66\)"):
        from_dict(d)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(d))
    code, _, err = run(capsys, "train", path)
    assert code == 2 and len(err.strip().splitlines()) == 1


def test_cli_invalid_source_config_is_one_line(llama_dir, tmp_path, capsys):
    import json

    cfg = json.loads((llama_dir / "config.json").read_text())
    (llama_dir / "config.json").write_text(json.dumps(dict(cfg, hidden_size=66)))
    code, _, err = run(capsys, "grow", llama_dir, tmp_path / "out", "--num-layers", 3)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "hidden size (66)" in err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------- every family: grown config round trip
COMMON_GROWTHS = [
    {"hidden_size": 64},
    {"hidden_size": 64, "num_heads": 8},
    {"intermediate_size": 256},
    {"num_layers": 4},
    {"num_layers": 3, "layer_placement": "top"},
    {"hidden_size": 64, "num_heads": 8, "intermediate_size": 256, "num_layers": 3},
]
GQA_GROWTHS = [
    {"num_heads": 8, "num_kv_heads": 4},
    {"hidden_size": 48, "num_heads": 6, "num_kv_heads": 3},
]
# head_dim tied to hidden/heads: more heads need a wider model
GQA_GROWTHS_TIED_HD = [
    {"hidden_size": 64, "num_heads": 8, "num_kv_heads": 4},
    {"hidden_size": 48, "num_heads": 6, "num_kv_heads": 3},
]
CASES = [(f, g) for f in FAMILIES for g in COMMON_GROWTHS] + [
    (f, g) for f in ("llama", "mistral", "qwen2", *(f for f, row in TABLE.items() if row[4])) for g in GQA_GROWTHS
] + [
    (f, g)
    for f in LLAMA_LIKE_TINY
    for g in (GQA_GROWTHS if get_adapter(tiny_model(f).config).head_dim_is_free() else GQA_GROWTHS_TIED_HD)
]


@pytest.mark.parametrize("family,growth", CASES, ids=[f"{f}-{'-'.join(f'{k}{v}' for k, v in g.items())}" for f, g in CASES])
def test_grown_config_round_trips_and_matches_shapes(family, growth, tmp_path):
    model = tiny_model(family)
    res = grow(model, verify=False, **growth)
    cfg = res.model.config
    adapter = get_adapter(cfg)
    _, predicted = GrowthSpec(**growth).resolve_config(model.config, adapter)
    assert adapter.read_sizes(predicted) == res.target_sizes  # the up-front config is the one grow() writes
    cfg.save_pretrained(tmp_path)  # runs transformers' own validation
    back = T.AutoConfig.from_pretrained(tmp_path)
    assert type(back) is type(cfg)
    assert adapter.read_sizes(back) == res.target_sizes
    for key in ("layer_types", "mlp_layer_types"):
        if getattr(back, key, None) is not None:
            assert len(getattr(back, key)) == res.target_sizes.layers
    # a model built from the reloaded config has exactly the grown model's parameter shapes
    with init_empty_weights():
        rebuilt = type(res.model)(back)
    want = {n: tuple(p.shape) for n, p in res.model.state_dict().items()}
    got = {n: tuple(p.shape) for n, p in rebuilt.state_dict().items()}
    assert got == want
    diff = {k for k in set(cfg.to_dict()) | set(back.to_dict())
            if k not in ("transformers_version", "_name_or_path") and cfg.to_dict().get(k) != back.to_dict().get(k)}
    assert not diff, {k: (cfg.to_dict().get(k), back.to_dict().get(k)) for k in diff}


# ---------------------------------------------------------------------- per-layer fields
@pytest.mark.parametrize("placement", ["interleave", "top", [0, 3]])
def test_qwen2_sliding_window_layers_rebuilt(placement, tmp_path):
    """``layer_types`` gets one entry per grown layer (each new layer takes its source layer's), and
    ``max_window_layers`` stays the threshold that produces those layer types."""
    torch.manual_seed(0)
    cfg = T.Qwen2Config(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                        num_hidden_layers=2, vocab_size=101, use_sliding_window=True, sliding_window=4,
                        max_window_layers=1)
    assert cfg.layer_types == ["full_attention", "sliding_attention"]
    model = perturb(T.Qwen2ForCausalLM(cfg)).eval()
    res = grow(model, num_layers=4, layer_placement=placement)
    new = res.model.config
    sources = res.maps.layer_src
    assert new.layer_types == [cfg.layer_types[s] for s in sources]
    _, predicted = GrowthSpec(num_layers=4, layer_placement=placement).resolve_config(cfg, get_adapter(cfg))
    assert (predicted.layer_types, predicted.max_window_layers) == (new.layer_types, new.max_window_layers)
    # the config class derives the same layer types from the rebuilt threshold
    d = new.to_dict()
    d.pop("layer_types")
    assert T.Qwen2Config(**{k: v for k, v in d.items() if k in T.Qwen2Config.__dataclass_fields__}).layer_types == new.layer_types
    new.save_pretrained(tmp_path)
    back = T.AutoConfig.from_pretrained(tmp_path)
    assert back.layer_types == new.layer_types and back.max_window_layers == new.max_window_layers
    # and the grown layers really run with those attention types
    for i, layer in enumerate(res.model.model.layers):
        assert layer.self_attn.sliding_window == (4 if new.layer_types[i] == "sliding_attention" else None)
    assert res.deviation["rel"] <= 1e-5


def test_gpt2_implicit_n_inner_written_explicitly(tmp_path):
    """GPT-2 leaves n_inner=None (= 4 x n_embd): widening must not silently grow the FFN on reload."""
    model = tiny_model("gpt2")
    assert model.config.n_inner is None
    res = grow(model, hidden_size=64, verify=False)
    assert res.model.config.n_inner == 128 == res.target_sizes.ffn
    res.model.config.save_pretrained(tmp_path)
    assert T.AutoConfig.from_pretrained(tmp_path).n_inner == 128


def test_per_layer_list_of_wrong_length_is_refused():
    """A per-layer list that does not match the layer count is named (not saved and found later)."""
    model = tiny_model("qwen2")
    adapter = get_adapter(model)
    sizes = adapter.read_sizes(model.config)
    cfg = adapter.write_config(model.config, sizes)
    object.__setattr__(cfg, "layer_types", ["full_attention"] * (sizes.layers + 1))  # bypass field validation
    with pytest.raises(ProgtrainConfigError, match="layer_types"):
        adapter.validate_config(cfg, sizes)
