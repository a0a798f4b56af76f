"""gradmax: fan-out from the top singular vectors of the gradient correlation, exact growth; and the
three data-driven strategies through `progtrain grow` on tiny GPT-2, BERT and Llama checkpoints."""

import pytest
import torch
import transformers as T

from progtrain.cli import main
from progtrain.growth import grow
from progtrain.growth.calibration import calibration_batches
from progtrain.io import read_growth_history
from progtrain.verify import compare_outputs, random_inputs
from tiny_models import tiny_model

# per family: (module reading the FFN input, FFN output module, up/gate fan-in weights, down weight, unit axis of down)
FFN = {
    "gpt2": ("transformer.h.{i}.mlp.c_fc", "transformer.h.{i}.mlp.c_proj", ["transformer.h.{i}.mlp.c_fc"], 0),
    "llama": ("model.layers.{i}.mlp.up_proj", "model.layers.{i}.mlp.down_proj", ["model.layers.{i}.mlp.up_proj"], 1),
}


def gradient_correlation_reference(model, batches, i, family):
    """M = mean over batches of sum_t dL/dz_out h_in^T, by plain hooks and autograd on the source model."""
    reader, out, _, _ = FFN[family]
    cap = {}
    r = model.get_submodule(reader.format(i=i)).register_forward_pre_hook(lambda m, a: cap.__setitem__("h", a[0]))
    o = model.get_submodule(out.format(i=i)).register_forward_hook(lambda m, a, y: cap.__setitem__("z", y))
    M = 0
    try:
        for b in batches:
            loss = model(**b).loss
            (g,) = torch.autograd.grad(loss, cap["z"])
            M = M + g.reshape(-1, g.shape[-1]).T @ cap["h"].reshape(-1, cap["h"].shape[-1])
    finally:
        r.remove()
        o.remove()
    return (M / len(batches)).detach()


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_gradmax_fanout_is_top_singular_vectors_and_growth_is_exact(family):
    model = tiny_model(family)
    batches = calibration_batches(model, None, n_batches=2, batch_size=4, seq_len=32, seed=3)
    n = model.config.n_inner or 4 * model.config.n_embd if family == "gpt2" else model.config.intermediate_size
    k = 6
    res = grow(model, intermediate_size=n + k, init="gradmax", data=batches)
    assert res.exact and res.deviation["rel"] <= 1e-6, res.deviation
    reader, _, fan_in, axis = FFN[family]
    params = dict(res.model.named_parameters())
    down_name = FFN[family][1]
    for i in range(model.config.num_hidden_layers):
        M = gradient_correlation_reference(model, batches, i, family).double()
        U, S, _ = torch.linalg.svd(M)
        assert float(S[k - 1] - S[k]) > 1e-3 * float(S[0])  # top-k subspace well defined
        down = params[down_name.format(i=i) + ".weight"].detach().double()
        new = down.index_select(axis, torch.arange(n, n + k)).movedim(axis, 0)  # k x d_out
        old = down.index_select(axis, torch.arange(n)).movedim(axis, 0)
        unit = new / new.norm(dim=1, keepdim=True)
        # column j is +/- the j-th left singular vector, scaled to the mean norm of the old columns
        cos = (unit @ U[:, :k]).abs()
        torch.testing.assert_close(cos, torch.eye(k, dtype=cos.dtype), atol=1e-4, rtol=0)
        torch.testing.assert_close(new.norm(dim=1), old.norm(dim=1).mean().expand(k), rtol=1e-5, atol=0)
        for name in fan_in:  # zero fan-in of the new units (the up rows; a gate keeps its draw)
            w = params[name.format(i=i) + ".weight"].detach()
            rows = w[:, n:] if family == "gpt2" else w[n:]
            assert float(rows.abs().max()) == 0.0
        if family == "llama":
            assert float(params[f"model.layers.{i}.mlp.gate_proj.weight"].detach()[n:].abs().max()) > 0


def _save_tiny(family, path):
    m = tiny_model(family)
    m.save_pretrained(path)
    return m


@pytest.mark.parametrize("family", ["gpt2", "bert", "llama"])
@pytest.mark.parametrize("init", ["gradmax", "signed_split", "gradinit"])
def test_cli_grow_with_data_driven_init_reloads(tmp_path, capsys, family, init):
    src, out = tmp_path / "src", tmp_path / "out"
    model = _save_tiny(family, src)
    n = model.config.n_inner or 4 * model.config.n_embd if family == "gpt2" else model.config.intermediate_size
    argv = ["grow", str(src), str(out), "--init", init, "--intermediate-size", str(n + 16), "--calib-batches", "2"]
    if family != "bert":
        argv += ["--num-layers", "3"]  # together with depth growth
    if init == "gradinit":
        argv += ["--init-option", "iters=4"]
    code = main(argv)
    text = capsys.readouterr()
    assert code == 0, text.err
    Auto = T.AutoModelForMaskedLM if family == "bert" else T.AutoModelForCausalLM
    grown = Auto.from_pretrained(out)  # plain transformers
    assert type(grown) is type(model)
    cfg = grown.config
    assert (cfg.n_inner if family == "gpt2" else cfg.intermediate_size) == n + 16
    rec = read_growth_history(out)[-1]
    assert rec["init"]["name"] == init and init.replace("_", "") in "".join(rec["strategy_report"]).replace("_", "")
    ids = random_inputs(model, 2, 12)
    dev = compare_outputs(model, grown, ids)
    if init == "gradmax":
        assert rec["exact"] and dev["rel"] <= 1e-5
    else:  # splits and rescaling change the function, by design, and say so
        assert not rec["exact"] and dev["rel"] > 1e-7
