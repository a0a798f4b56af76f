"""``aki`` (bert2BERT's advanced knowledge initialization): new FFN units and heads of layer l are
the units of layer l+1 (the top layer: its own), fan-out zero, growth exact (measured)."""

import pytest
import torch
import transformers as T

from progtrain import grow
from progtrain.arch import base_prefix, get_adapter
from progtrain.cli import main
from progtrain.init import available_strategies, describe_options
from progtrain.io import read_growth_history
from tiny_models import FAMILIES, tiny_model

FAN_IN_ROLES = ("up", "gate", "q", "k", "v", "qkv")
UNIT_TAGS = ("ffn.out", "q.out", "k.out", "v.out", "qkv.out")


def _model(family):
    return tiny_model(family, bias=True) if family == "llama" else tiny_model(family)


def _new_heads(is_new_row: torch.Tensor, head_dim: int) -> list[int]:
    """Heads whose rows are all new, in order."""
    per_head = is_new_row.view(-1, head_dim)
    return [h for h in range(per_head.shape[0]) if bool(per_head[h].all())]


def _pairs(tag, res, is_new, layout=None):
    """(grown index, donor index) along the unit axis: the m-th new unit/head <- the donor's m mod N."""
    s, t = res.source_sizes, res.target_sizes
    hd = t.head_dim
    if tag == "ffn.out":
        new = is_new.nonzero().flatten().tolist()
        return [(j, m % s.ffn) for m, j in enumerate(new)]
    if tag == "qkv.out" and layout == "per_head":  # GPT-NeoX: (heads, 3, head_dim)
        heads = _new_heads(is_new, 3 * hd)
        return [(h * 3 * hd + e, (m % s.heads) * 3 * hd + e) for m, h in enumerate(heads) for e in range(3 * hd)]
    if tag == "qkv.out":  # GPT-2's concat layout: [q | k | v], each heads x head_dim
        n_new, n_old = t.heads * hd, s.heads * s.head_dim
        out = []
        for p in range(3):
            heads = _new_heads(is_new[p * n_new : (p + 1) * n_new], hd)
            for m, h in enumerate(heads):
                d = m % s.heads
                out += [(p * n_new + h * hd + e, p * n_old + d * hd + e) for e in range(hd)]
        return out
    n_heads_old = s.heads if tag == "q.out" else s.kv_heads
    out = []
    for m, h in enumerate(_new_heads(is_new, hd)):
        d = m % n_heads_old
        out += [(h * hd + e, d * hd + e) for e in range(hd)]
    return out


def _fold_hidden(w, axes, res):
    """Sum the k tiled copies of the stream along the fan-in axis (undoes the 1/k split)."""
    d, D = res.source_sizes.hidden, res.target_sizes.hidden
    if "hidden.in" not in axes or d == D:
        return w
    ax = axes.index("hidden.in")
    assert D % d == 0
    shape = list(w.shape)
    shape[ax : ax + 1] = [D // d, d]
    return w.reshape(shape).sum(dim=ax)


def check_aki_rows(old, res):
    """Every new fan-in row (and bias entry) of every layer equals the donor layer's row; returns the
    roles checked with their number of rows. Also: new fan-out entries are zero."""
    adapter, prefix = get_adapter(old), base_prefix(old)
    new_prefix = base_prefix(res.model)
    L = res.source_sizes.layers
    grown = dict(res.model.named_parameters())
    olds = dict(old.named_parameters())
    checked: dict[str, int] = {}
    for layer in range(res.target_sizes.layers):
        src = res.maps.layer_src[layer]
        donor = min(src + 1, L - 1)
        for suffix, spec in adapter.layer_params.items():
            name = adapter.layer_param_name(new_prefix, layer, suffix)
            if name not in grown:
                continue
            g = grown[name].detach().float()
            pm = res.param_maps[name]
            for ax, tag in enumerate(spec.axes):
                if tag in ("ffn.in", "o.in"):  # fan-out of new units / heads: zero
                    sel = (pm.plans[ax].src < 0).nonzero().flatten()
                    assert not bool(g.index_select(ax, sel).any()), name
            if spec.role not in FAN_IN_ROLES:
                continue
            ax = next(i for i, tg in enumerate(spec.axes) if tg in UNIT_TAGS)
            o = olds[adapter.layer_param_name(prefix, donor, suffix)].detach().float()
            own = olds[adapter.layer_param_name(prefix, src, suffix)].detach().float()
            pairs = _pairs(spec.axes[ax], res, pm.plans[ax].src < 0, adapter.fused_qkv)
            if not pairs:  # this space did not grow
                continue
            gi = torch.tensor([p[0] for p in pairs])
            di = torch.tensor([p[1] for p in pairs])
            got = _fold_hidden(g, spec.axes, res).index_select(ax, gi)
            want = o.index_select(ax, di)
            assert torch.allclose(got, want, rtol=0, atol=1e-6 * float(want.abs().max())), name
            if donor != src:  # the copies come from another layer: not the layer's own units
                assert not torch.allclose(got, own.index_select(ax, di)), name
            checked[spec.role] = checked.get(spec.role, 0) + len(pairs)
    return checked


CASES = {
    "gpt2": {"ffn": dict(intermediate_size=320), "heads": dict(hidden_size=64, num_heads=8)},
    "bert": {"ffn": dict(intermediate_size=160), "heads": dict(hidden_size=64, num_heads=8)},
    "llama": {"ffn": dict(intermediate_size=160), "heads": dict(num_heads=16)},  # 12 new heads > 4 old: cycles
}


@pytest.mark.parametrize("kind", ["ffn", "heads"])
@pytest.mark.parametrize("family", sorted(CASES))
def test_aki_exact_and_rows_from_next_layer(family, kind):
    old = _model(family)
    res = grow(old, init="aki", **CASES[family][kind])
    assert res.exact and res.deviation["rel"] <= 1e-5, res.deviation
    assert res.record["init"]["name"] == "aki"
    roles = set(check_aki_rows(old, res))
    if kind == "ffn":
        assert roles == ({"up", "gate"} if family == "llama" else {"up"})
    else:
        # llama keeps its 2 kv heads here (new kv heads: test_aki_cycles_and_kv_heads)
        assert roles == {"gpt2": {"qkv"}, "bert": {"q", "k", "v"}, "llama": {"q"}}[family]
    rep = res.record["strategy_report"]["aki"]
    assert rep["donor_layer"] == {"0": 1, "1": 1} and rep["entries_from_next_layer"] > 0


def test_aki_cycles_and_kv_heads():
    """More new units than old ones cycle through the donor's units; new kv heads copy kv heads."""
    old = _model("llama")
    res = grow(old, init="aki", num_heads=8, num_kv_heads=4, intermediate_size=200)
    assert res.exact
    per_tensor = {"q": 4 * 8, "k": 2 * 8, "v": 2 * 8, "up": 136, "gate": 136}  # new rows (head_dim 8)
    # 2 layers x (weight rows + bias entries)
    assert check_aki_rows(old, res) == {r: 2 * 2 * n for r, n in per_tensor.items()}


@pytest.mark.parametrize("family", FAMILIES)
def test_aki_exact_every_family(family):
    """FFN + heads (+ hidden) growth with aki keeps the function in every family."""
    old = tiny_model(family)
    kw = dict(intermediate_size=160)
    adapter = get_adapter(old)
    if adapter.qk_norm == "projection":
        kw["hidden_size"] = 64  # new heads change a projection-wide q/k norm: approximate by construction
    elif adapter.head_dim_is_free():
        kw["num_heads"] = 8
    else:
        kw.update(hidden_size=64, num_heads=8)
    res = grow(old, init="aki", **kw)
    assert res.exact and res.deviation["rel"] <= 1e-5, res.deviation
    check_aki_rows(old, res)


@pytest.mark.parametrize("family, kw", [("llama", dict(hidden_size=48)), ("gpt2", dict(hidden_size=48, num_heads=6))])
def test_aki_padded_hidden_columns_from_next_layer(family, kw):
    """Non-integer widening: the readers' columns for new stream coordinates (free: every norm
    outputs zero there) are the next layer's columns c mod d; the growth stays exact."""
    old = tiny_model(family)
    res = grow(old, init="aki", **kw)
    assert res.exact, res.deviation
    adapter, p_old, p_new = get_adapter(old), base_prefix(old), base_prefix(res.model)
    d, D = res.source_sizes.hidden, res.target_sizes.hidden
    for layer in range(2):
        for suffix, spec in adapter.layer_params.items():
            if spec.role not in FAN_IN_ROLES or len(spec.axes) != 2:
                continue
            ax = spec.axes.index("hidden.in")
            g = res.model.get_parameter(adapter.layer_param_name(p_new, layer, suffix)).detach()
            o = old.get_parameter(adapter.layer_param_name(p_old, 1, suffix)).detach()
            # the old units' rows (first ones along the unit axis) at the new columns
            uax = 1 - ax
            n_old_units = o.shape[uax]
            got = g.narrow(uax, 0, n_old_units).narrow(ax, d, D - d)
            want = o.index_select(ax, torch.arange(d, D) % d)
            if family == "gpt2" and spec.role == "qkv":
                continue  # fused rows are re-laid out when heads grow; covered by check_aki_rows
            assert torch.equal(got, want), suffix


def test_aki_with_depth_growth_uses_source_plus_one():
    old = _model("llama")
    res = grow(old, init="aki", num_layers=4, intermediate_size=96)
    assert res.exact
    assert check_aki_rows(old, res) == {"up": 4 * 2 * 32, "gate": 4 * 2 * 32}  # 4 layers x (weight + bias)


def test_aki_registered_and_documented():
    assert "aki" in available_strategies()
    text = describe_options("aki")
    assert text.startswith("aki: ") and "scale (float" in text


def test_cli_grow_init_aki(tmp_path, capsys):
    src, out = tmp_path / "src", tmp_path / "out"
    old = _model("llama")
    old.save_pretrained(src)
    code = main(["grow", str(src), str(out), "--intermediate-size", "96", "--num-heads", "8", "--init", "aki"])
    text = capsys.readouterr().out
    assert code == 0
    assert "init: aki" in text and "APPROXIMATE" not in text
    rec = read_growth_history(out)[-1]
    assert rec["init"] == {"name": "aki", "scale": 1.0} and rec["exact"] is True and rec["deviation"]["rel"] <= 1e-5
    model = T.AutoModelForCausalLM.from_pretrained(out)
    up0 = model.model.layers[0].mlp.up_proj.weight.detach()
    assert torch.equal(up0[64:96], old.model.layers[1].mlp.up_proj.weight.detach()[:32])
