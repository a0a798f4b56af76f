"""variance_transfer: fan-in rescale and new-block variances, exactness without the rescale, paired
fan-out, the per-block deviation report, and `progtrain grow --init variance_transfer` + reload."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
import transformers as T

from progtrain import grow
from progtrain.cli import main
from progtrain.errors import ProgtrainConfigError
from tiny_models import perturb, tiny_model

TOL = 1e-5  # the core's exactness tolerance, relative to max |logits|


@pytest.fixture(scope="module")
def wide_llama():
    """A 1-layer Llama with 512-wide layers (hidden 512, 8 heads of 64, FFN 512)."""
    torch.manual_seed(0)
    cfg = T.LlamaConfig(hidden_size=512, num_attention_heads=8, num_key_value_heads=8, intermediate_size=512,
                        num_hidden_layers=1, vocab_size=101)
    return perturb(T.LlamaForCausalLM(cfg), 0.05).eval()


@pytest.mark.parametrize("rescale,power", [("sqrt", 0.5), ("linear", 1.0)])
def test_variances_follow_the_fan_in_rule(wide_llama, rescale, power):
    """hidden 512 -> 768 and FFN 512 -> 1024: old blocks are rescaled by (n/N)**p exactly; new free
    blocks have variance var_old * (n/N)**(2p) within 5%."""
    res = grow(wide_llama, hidden_size=768, intermediate_size=1024, init="variance_transfer",
               init_kwargs={"rescale": rescale, "measure": False}, verify=False)
    old = dict(wide_llama.named_parameters())
    new = dict(res.model.named_parameters())
    checked = 0
    for suffix, n_old, n_new in [("self_attn.q_proj.weight", 512, 768), ("self_attn.v_proj.weight", 512, 768),
                                 ("mlp.up_proj.weight", 512, 768), ("mlp.down_proj.weight", 512, 1024)]:
        name = "model.layers.0." + suffix
        w_old, w_new = old[name].detach(), res.model.get_parameter(name).detach()
        f = (n_old / n_new) ** power
        rows, cols = w_old.shape
        # the old block is the old tensor times f (same positions: padding appends)
        assert torch.allclose(w_new[:rows, :cols], w_old * f, rtol=1e-6, atol=0), name
        assert abs(float(w_new[:rows, :cols].var() / w_old.var()) - f * f) < 1e-4
        if w_new.shape[1] > cols and "down" not in suffix:  # free fan-in block (reads new stream coords)
            blk = w_new[:, cols:]
            want = float(w_old.std()) ** 2 * f * f
            assert abs(float(blk.var()) / want - 1) < 0.05, (name, float(blk.var()), want)
            assert blk.numel() >= 512 * 256
            checked += 1
        assert res.record["strategy_report"]["variance_transfer"]["factors"][name] == pytest.approx(f, rel=1e-5)
    # new FFN units' up rows: fan-in grew 512 -> 768 as well
    up = new["model.layers.0.mlp.up_proj.weight"].detach()[512:]
    want = float(old["model.layers.0.mlp.up_proj.weight"].detach().std()) ** 2 * (512 / 768) ** (2 * power)
    assert abs(float(up.var()) / want - 1) < 0.05
    # new units' down columns are zero fan-out
    assert float(new["model.layers.0.mlp.down_proj.weight"].detach()[:, 512:].abs().max()) == 0.0
    assert checked == 3
    # verify=False: nothing measured, so no exact/approximate claim; the rescale is declared up front
    assert res.exact is None and res.expected_exact is False
    assert any("variance_transfer rescale" in n for n in res.notes)


@pytest.mark.parametrize("family", ["gpt2", "bert", "llama"])
@pytest.mark.parametrize("fan_out", ["zero", "paired"])
def test_exact_without_rescale(family, fan_out):
    model = tiny_model(family)
    res = grow(model, hidden_size=64, num_heads=8, intermediate_size=160, init="variance_transfer",
               init_kwargs={"rescale": "none", "fan_out": fan_out})
    assert res.deviation["rel"] <= TOL and res.exact, (res.deviation, res.notes)
    if fan_out == "paired":
        rep = res.record["strategy_report"]["variance_transfer"]
        assert rep["unit_pairs"] > 0
        # the new units of layer 0 come in pairs: same fan-in, opposite non-zero fan-out
        down_name = next(n for n, p in res.param_maps.items() if "ffn.in" in _axes(res, n) and ".0." in n and n.endswith("weight"))
        up_name = next(n for n in res.param_maps if "ffn.out" in _axes(res, n) and ".0." in n and n.endswith("weight"))
        down, up = res.model.get_parameter(down_name).detach(), res.model.get_parameter(up_name).detach()
        ax_d, ax_u = _axes(res, down_name).index("ffn.in"), _axes(res, up_name).index("ffn.out")
        a, b = down.select(ax_d, 128), down.select(ax_d, 129)
        assert float(a.abs().max()) > 0 and torch.equal(a, -b)
        assert torch.equal(up.select(ax_u, 128), up.select(ax_u, 129))
        assert not torch.equal(up.select(ax_u, 128), up.select(ax_u, 130))


def _axes(res, name):
    from progtrain.arch.base import base_prefix

    return res.maps.adapter.classify(name, base_prefix(res.model))[0].axes


def test_rescale_reports_per_block_deviation(caplog):
    model = tiny_model("llama")
    with caplog.at_level("INFO", logger="progtrain.init.variance_transfer"):
        res = grow(model, hidden_size=48, intermediate_size=96, init="variance_transfer")
    rep = res.record["strategy_report"]["variance_transfer"]
    dev = rep["block_deviation"]
    assert set(dev) == {"layer 0", "layer 1", "non-layer"}  # the untied LM head reads the wider stream
    assert all(d > TOL for d in dev.values())
    assert not res.exact and res.deviation["rel"] > TOL
    # the blocks' deviations are measured one at a time; none exceeds what all of them do by far, and
    # the measurement leaves the rescaled weights in place (the model's deviation is the total one)
    assert max(dev.values()) < 10 * res.deviation["rel"]
    from progtrain.verify import measure_deviation

    assert measure_deviation(model, res.model, maps=res.maps)["rel"] == pytest.approx(res.deviation["rel"], rel=1e-6)
    mine = [r.getMessage() for r in caplog.records if r.name == "progtrain.init.variance_transfer"]
    assert any(m.startswith("variance_transfer layer 0:") and "q_proj.weight x0.8165" in m for m in mine)
    assert any("layer 0" in m and "rescale" in m for m in mine)


@pytest.mark.parametrize("fan_out", ["zero", "paired"])
def test_block_deviation_is_the_effect_of_that_blocks_rescale(fan_out):
    """Independent check of the report: the same growth without the rescale draws the same new
    entries; putting only layer 0's rescaled tensors into it moves the logits by the reported amount."""
    import copy

    from progtrain.verify import model_outputs, random_inputs

    model = tiny_model("gpt2", tie=False)
    kw = dict(hidden_size=48, intermediate_size=192, init="variance_transfer", seed=3, verify=False)
    r_on = grow(model, **kw, init_kwargs={"fan_out": fan_out})
    r_off = grow(model, **kw, init_kwargs={"fan_out": fan_out, "rescale": "none"})
    rep = r_on.record["strategy_report"]["variance_transfer"]
    layer0 = [n for n in rep["factors"] if ".h.0." in n]
    assert layer0 and len(layer0) < len(rep["factors"])
    mixed = copy.deepcopy(r_off.model)
    for n in layer0:
        mixed.get_parameter(n).data.copy_(r_on.model.get_parameter(n).detach())
        # the rescale touches exactly the entries built from old values: new entries are identical
        on, off = r_on.model.get_parameter(n).detach(), r_off.model.get_parameter(n).detach()
        assert torch.allclose(on[on != off], off[on != off] * rep["factors"][n], rtol=1e-5)
    ids = random_inputs(model)
    base, y = model_outputs(r_off.model, ids)[1], model_outputs(mixed, ids)[1]
    want = float((y - base).abs().max() / base.abs().max())
    assert want > TOL and rep["block_deviation"]["layer 0"] == pytest.approx(want, rel=1e-4)
    others = [n for n in r_on.model.state_dict() if n not in rep["factors"]]
    assert all(torch.equal(r_on.model.state_dict()[n], r_off.model.state_dict()[n]) for n in others)


def test_bad_options():
    with pytest.raises(ProgtrainConfigError, match="rescale"):
        grow(tiny_model("gpt2"), hidden_size=64, init="variance_transfer", init_kwargs={"rescale": "cubic"})
    with pytest.raises(ProgtrainConfigError, match="fan_out"):
        grow(tiny_model("gpt2"), hidden_size=64, init="variance_transfer", init_kwargs={"fan_out": "triple"})


RELOAD = textwrap.dedent(
    """
    import json, sys, torch, transformers
    out = {}
    for path, auto in json.loads(sys.argv[1]):
        model, info = getattr(transformers, auto).from_pretrained(path, output_loading_info=True)
        with torch.no_grad():
            logits = model.eval()(input_ids=torch.arange(1, 13).view(2, 6)).logits
        torch.save(logits, path + "/reloaded.pt")
        out[path] = sorted(info["missing_keys"]) + sorted(info["unexpected_keys"])
    assert "progtrain" not in sys.modules
    print(json.dumps(out))
    """
)


def test_cli_grow_and_plain_reload(tmp_path, capsys):
    cases = []
    for family, auto, opts in [
        ("gpt2", "AutoModelForCausalLM", []),
        ("bert", "AutoModelForMaskedLM", []),
        ("llama", "AutoModelForCausalLM", ["--init-option", "rescale=none", "--init-option", "fan_out=paired"]),
    ]:
        src, out = tmp_path / f"{family}_src", tmp_path / f"{family}_grown"
        tiny_model(family).save_pretrained(src)
        code = main(["grow", str(src), str(out), "--hidden-size", "64", "--intermediate-size", "160",
                     "--init", "variance_transfer", *opts])
        text = capsys.readouterr().out
        assert code == 0
        if opts:
            assert "exact" in text and "APPROXIMATE" not in text
        else:
            assert "APPROXIMATE" in text and "variance_transfer rescale=sqrt" in text and "layer 0" in text
        cases.append((str(out), auto))
    proc = subprocess.run([sys.executable, "-c", RELOAD, json.dumps(cases)], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert all(v == [] for v in json.loads(proc.stdout.strip().splitlines()[-1]).values())
    for path, auto in cases:
        model = getattr(T, auto).from_pretrained(path).eval()
        with torch.no_grad():
            want = model(input_ids=torch.arange(1, 13).view(2, 6)).logits
        assert torch.allclose(torch.load(path + "/reloaded.pt"), want, atol=1e-6 * float(want.abs().max()))
