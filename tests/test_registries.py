"""Registries refuse mistakes (issue 14.3): typed strategy options (unknown option -> one line listing
the valid ones with their defaults, wrong type or range -> one line), duplicate names refused,
adapter roles checked against the declared set; the same checks through the CLI and a run config."""

import dataclasses
import json
import types
import typing

import pytest

from progtrain.arch import ROLES, ArchAdapter, get_adapter
from progtrain.arch.base import _REGISTRY, P, register_adapter
from progtrain.cli import main
from progtrain.errors import ProgtrainConfigError
from progtrain.init import (
    InitStrategy,
    StrategyOptions,
    available_strategies,
    describe_options,
    get_strategy,
    option,
    register_strategy,
)
from progtrain.init.base import _STRATEGIES
from progtrain.train.config import from_dict
from tiny_models import FAMILIES, tiny_model

STRATEGIES = available_strategies()


def _fields(name):
    return dataclasses.fields(get_strategy(name).Options)


# ---------------------------------------------------------------------- unknown options
@pytest.mark.parametrize("name", STRATEGIES)
def test_unknown_option_lists_every_valid_option_with_its_default(name):
    with pytest.raises(ProgtrainConfigError) as e:
        get_strategy(name, no_such_option=1)
    msg = str(e.value)
    assert "\n" not in msg and "'no_such_option'" in msg and f"init strategy {name!r}" in msg
    defaults = get_strategy(name).Options.defaults()
    for k, v in defaults.items():
        assert f"{k}={v!r}" in msg, (k, msg)
    if not defaults:
        assert "no options" in msg


# ---------------------------------------------------------------------- types and ranges
@pytest.mark.parametrize(
    "name, opts, needle",
    [
        ("function_preserving", {"scale": -1}, "option scale=-1.0: must be >= 0"),
        ("random", {"std": 0}, "option std=0.0: must be > 0"),
        ("gradinit", {"lr": -1e-3}, "option lr=-0.001: must be > 0"),
        ("gradinit", {"iters": -1}, "option iters=-1: must be >= 0"),
        ("gradinit", {"gamma": 0}, "option gamma=0.0: must be > 0"),
        ("gradinit", {"optimizer": "lamb"}, "option optimizer='lamb': expected one of 'adam', 'sgd'"),
        ("gradinit", {"iters": "many"}, "option iters='many': expected an integer"),
        ("gradinit", {"iters": 2.5}, "option iters=2.5: expected an integer"),
        ("gradinit", {"only_new": 1}, "option only_new=1: expected true or false"),
        ("gradmax", {"fanout_scale": 0}, "option fanout_scale=0.0: must be > 0"),
        ("gradmax", {"scale_method": "max"}, "expected one of 'mean_norm', 'fixed'"),
        ("signed_split", {"eps": 0}, "option eps=0.0: must be > 0"),
        ("signed_split", {"lanczos_steps": 0}, "option lanczos_steps=0: must be >= 1"),
        ("mixture", {"num_templates": 1}, "option num_templates=1: use at least 2"),
        ("mixture", {"roles": ["q", "upp"]}, "unknown role(s) ['upp']"),
        ("mixture", {"coefficients": "best"}, "expected one of 'alternate', 'orthogonal', 'least_covered'"),
        ("variance_transfer", {"rescale": "cube"}, "option rescale='cube': expected one of 'sqrt', 'linear', 'none'"),
        ("variance_transfer", {"measure": "maybe"}, "expected true or false"),
        ("random", {"std": True}, "expected a number or None"),
    ],
)
def test_bad_value_is_one_line_naming_strategy_option_and_rule(name, opts, needle):
    with pytest.raises(ProgtrainConfigError) as e:
        get_strategy(name, **opts)
    msg = str(e.value)
    assert needle in msg and f"init strategy {name!r}" in msg and "\n" not in msg, msg


def test_values_from_cli_and_yaml_strings_are_converted():
    """`--init-option lr=5e-3` reaches the strategy as the string '5e-3' (YAML 1.1 reads it so):
    numbers, None, booleans and comma-separated lists are converted to the field's type."""
    o = get_strategy("gradinit", lr="5e-3", iters="4", gamma="none", only_new="false", alpha=0).options
    assert (o.lr, o.iters, o.gamma, o.only_new, o.alpha) == (5e-3, 4, None, False, 0.0)
    assert type(o.lr) is float and type(o.iters) is int and type(o.alpha) is float
    assert get_strategy("mixture", roles="q, k,up").options.roles == ["q", "k", "up"]
    assert get_strategy("random", std="null").options.std is None


def test_options_instance_and_keywords():
    from progtrain.init.gradinit import GradInit, GradInitOptions

    s = GradInit(GradInitOptions(iters=7))
    assert s.options.iters == 7 and s.describe()["iters"] == 7
    with pytest.raises(ProgtrainConfigError, match="takes one GradInitOptions"):
        GradInit(StrategyOptions())


# ---------------------------------------------------------------------- round trip and docs
def _other_value(tp, default):
    """A valid value of type ``tp`` different from ``default``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Literal:
        return next(a for a in args if a != default)
    if origin in (typing.Union, types.UnionType):  # Optional[X]: a value of X
        return _other_value(next(a for a in args if a is not type(None)), default)
    if origin is list:
        return list(default)[:1] or ["q"]
    if tp is bool:
        return not default
    if tp is int:
        return (default or 0) + 3
    if tp is float:
        return (default or 0.25) * 2
    raise AssertionError(tp)


@pytest.mark.parametrize("name", STRATEGIES)
def test_describe_round_trips_through_json_and_get_strategy(name):
    cls = type(get_strategy(name))
    hints = typing.get_type_hints(cls.Options)
    for values in ({}, {f.name: _other_value(hints[f.name], cls.Options.defaults()[f.name]) for f in _fields(name)}):
        s = get_strategy(name, **values)
        d = json.loads(json.dumps(s.describe()))
        assert d.pop("name") == name
        again = get_strategy(name, **d)
        assert again.options == s.options and type(again) is type(s)
        for k, v in values.items():
            assert getattr(s.options, k) == v


@pytest.mark.parametrize("name", STRATEGIES)
def test_every_option_is_documented(name):
    text = describe_options(name)
    assert text.startswith(f"{name}: ")
    for f in _fields(name):
        assert f.metadata.get("help"), f"{name}.{f.name} has no help text"
        assert f"  {f.name} (" in text


def test_grow_help_lists_every_strategy_and_option(capsys):
    with pytest.raises(SystemExit) as e:
        main(["grow", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "--init-option" in text and "describe_options" in text
    for name in STRATEGIES:
        assert f"\n{name}: " in text
        for f in _fields(name):
            assert f"  {f.name} (" in text


# ---------------------------------------------------------------------- through the CLI and a run config
@pytest.mark.parametrize(
    "opts, needle",
    [
        (["bogus=1"], "has no option 'bogus'; valid options: scale=1.0, only_new=True, iters=300"),
        (["lr=-1"], "init strategy 'gradinit' option lr=-1.0: must be > 0"),
    ],
)
def test_cli_bad_init_option_exits_2_nothing_written(tmp_path, capsys, opts, needle):
    src, out = tmp_path / "src", tmp_path / "out"
    tiny_model("gpt2").save_pretrained(src)
    argv = ["grow", str(src), str(out), "--intermediate-size", "160", "--init", "gradinit"]
    for o in opts:
        argv += ["--init-option", o]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("progtrain grow: error:") and needle in err, err
    assert not out.exists()


def test_cli_init_options_typed_in_the_record(tmp_path, capsys):
    """`--init-option measure=false` reaches the strategy as a bool, and the grown checkpoint's
    record holds the typed options."""
    from progtrain.io import read_growth_history

    src, out = tmp_path / "src", tmp_path / "out"
    tiny_model("gpt2").save_pretrained(src)
    code = main(["grow", str(src), str(out), "--intermediate-size", "160", "--init", "variance_transfer",
                 "--init-option", "rescale=none", "--init-option", "measure=false"])
    assert code == 0, capsys.readouterr().err
    init = read_growth_history(out)[-1]["init"]
    assert init == {"name": "variance_transfer", "rescale": "none", "fan_out": "zero", "measure": False}


def _run_config(init_kwargs):
    return {
        "output_dir": "unused",
        "model": {"family": "gpt2", "config": {"n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 64}},
        "data": {"seq_len": 32, "vocab_size": 300},
        "train": {"max_steps": 20, "batch_size": 4},
        "stages": [{"name": "wide", "start_step": 5, "grow": {"hidden_size": 64}, "init": "gradinit",
                    "init_kwargs": init_kwargs}],
    }


def test_run_config_init_options_checked():
    from_dict(_run_config({"iters": "4", "lr": "1e-3"}))  # strings from YAML convert
    with pytest.raises(ProgtrainConfigError) as e:
        from_dict(_run_config({"iterations": 4}))
    msg = str(e.value)
    assert msg.startswith("stages[0] (wide): init strategy 'gradinit' has no option 'iterations'") and "iters=300" in msg
    with pytest.raises(ProgtrainConfigError, match=r"stages\[0\] \(wide\): init strategy 'gradinit' option alpha=-1.0"):
        from_dict(_run_config({"alpha": -1}))


# ---------------------------------------------------------------------- duplicate names
def test_duplicate_strategy_name_refused():
    before = dict(_STRATEGIES)

    class Other(InitStrategy):
        def init_tensor(self, t):
            pass

    with pytest.raises(ProgtrainConfigError, match="init strategy 'random' is already registered"):
        register_strategy("random")(Other)
    assert _STRATEGIES == before and get_strategy("random").name == "random"


def test_strategy_options_owned_by_one_strategy():
    from progtrain.init.function_preserving import FunctionPreserving, FunctionPreservingOptions

    class Reuses(FunctionPreserving):
        Options = FunctionPreservingOptions

    with pytest.raises(ProgtrainConfigError, match="already belongs to strategy 'function_preserving'"):
        register_strategy("reuses_options")(Reuses)
    assert "reuses_options" not in _STRATEGIES

    @dataclasses.dataclass
    class NewOptions(StrategyOptions):
        k: int = option(2, "a test option")

        def __post_init__(self):
            self.require(self.k > 0, "k", "must be > 0")

    class New(InitStrategy):
        Options = NewOptions

        def init_tensor(self, t):
            pass

    try:
        register_strategy("test_new_strategy")(New)
        assert get_strategy("test_new_strategy", k="5").options.k == 5
        with pytest.raises(ProgtrainConfigError, match="init strategy 'test_new_strategy' option k=0: must be > 0"):
            get_strategy("test_new_strategy", k=0)
    finally:
        _STRATEGIES.pop("test_new_strategy", None)


# ---------------------------------------------------------------------- adapter roles
def test_every_registered_adapter_role_is_declared():
    for family in FAMILIES:
        a = get_adapter(tiny_model(family).config)
        for table in (a.params, a.layer_params, a.head_params):
            assert {s.role for s in table.values()} <= set(ROLES)


def test_adapter_with_unknown_role_refused():
    gpt2 = get_adapter(tiny_model("gpt2").config)
    bad = dataclasses.replace(
        gpt2, name="gpt2_typo", model_types=("gpt2_typo",),
        layer_params={**gpt2.layer_params, "mlp.c_fc.weight": P("upp", "hidden.in", "ffn.out")},
    )
    with pytest.raises(ProgtrainConfigError) as e:
        register_adapter(bad)
    msg = str(e.value)
    assert "adapter 'gpt2_typo'" in msg and "'mlp.c_fc.weight'" in msg and "unknown role 'upp'" in msg
    assert "gpt2_typo" not in _REGISTRY


def test_adapter_for_a_taken_model_type_refused():
    gpt2 = _REGISTRY["gpt2"]
    with pytest.raises(ProgtrainConfigError, match="model_type 'gpt2' already has the adapter 'gpt2'"):
        register_adapter(dataclasses.replace(gpt2, name="gpt2_again"))
    assert _REGISTRY["gpt2"] is gpt2 and isinstance(gpt2, ArchAdapter)
