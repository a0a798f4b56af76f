"""gradinit: the GradInit objective on a tiny post-LN BERT and a tiny GPT-2; baking; after a growth."""

import pytest
import torch
from torch.func import functional_call

from progtrain.errors import ProgtrainConfigError
from progtrain.growth import grow
from progtrain.growth.calibration import calibration_batches
from progtrain.init.gradinit import bake_scales_, gradinit_, lookahead_loss
from progtrain.verify import random_inputs
from tiny_models import tiny_model


@pytest.mark.parametrize(
    "family,optimizer,alpha,gamma_factor",
    [
        ("bert", "adam", 0.01, None),  # post-LN
        ("gpt2", "adam", 0.9, None),  # a binding lower bound
        ("bert", "sgd", 0.01, 0.8),  # a binding gradient-norm bound: infeasible at scales = 1
    ],
)
def test_gradinit_objective_bounds_and_baking(family, optimizer, alpha, gamma_factor):
    model = tiny_model(family)
    # uniform tokens: a loss with a systematic gradient (on the model's own samples, the default without
    # a tokenizer, the mean gradient is zero and the gradient-norm bound can be out of reach)
    batches = calibration_batches(model, None, n_batches=2, batch_size=4, seq_len=24, seed=4, tokenizer_free="uniform")
    la0, g0 = lookahead_loss(model, batches, optimizer=optimizer)
    gamma = None if gamma_factor is None else gamma_factor * g0
    res = gradinit_(model, batches, iters=20, lr=2e-2, alpha=alpha, gamma=gamma, optimizer=optimizer, bake=False,
                    progress=False)
    la1, g1 = lookahead_loss(model, batches, res.scales, optimizer=optimizer)
    assert la0 == pytest.approx(res.lookahead_before) and la1 == pytest.approx(res.lookahead_after)
    assert la1 < la0  # the look-ahead loss improved over scales = 1
    assert min(res.scales.values()) >= alpha  # lower bound
    assert g1 <= res.gamma * (1 + 1e-6)  # gradient-norm constraint on every batch
    if gamma_factor is not None:
        assert res.gamma == pytest.approx(gamma) and res.constraint_steps > 0 and g0 > res.gamma
    if alpha == 0.9:
        assert min(res.scales.values()) == pytest.approx(alpha)  # the bound was active
    # baking: forward of the baked weights equals the forward of the scaled model
    ids = random_inputs(model, 2, 16)
    params = dict(model.named_parameters())
    with torch.no_grad():
        plain = model(ids).logits
        scaled_params = {n: res.scales[n] * p for n, p in params.items() if n in res.scales}
        scaled = functional_call(model, scaled_params, (ids,)).logits
        bake_scales_(model, res.scales)
        baked = model(ids).logits
    assert float((baked - scaled).abs().max()) <= 1e-6 * float(scaled.abs().max())
    assert float((baked - plain).abs().max()) > 1e-3 * float(plain.abs().max())  # the scales matter


def test_gradinit_after_growth_tunes_only_new_tensors():
    model = tiny_model("gpt2")
    batches = calibration_batches(model, None, n_batches=2, batch_size=4, seq_len=24, seed=5)
    res = grow(model, intermediate_size=160, init="gradinit", init_kwargs={"iters": 10, "lr": 2e-2}, data=batches,
               seed=1)
    ref = grow(model, intermediate_size=160, init="function_preserving", seed=1)
    rep = res.record["strategy_report"]["gradinit"]
    born = [n for n, pm in res.param_maps.items() if bool(pm.born_mask().any())]
    assert rep["tensors"] == len(born) == 2 * 3  # c_fc weight, c_fc bias, c_proj weight in 2 layers
    assert rep["lookahead_after"] < rep["lookahead_before"]
    new, old = dict(res.model.named_parameters()), dict(ref.model.named_parameters())
    for n in old:  # tensors without born elements are untouched; born ones are rescaled as a whole
        ratio = (new[n].detach() / old[n].detach())[old[n].detach().abs() > 1e-3]
        if n in born:
            assert float(ratio.std()) < 1e-5 and abs(float(ratio.mean()) - 1) > 1e-4
        else:
            assert torch.equal(new[n], old[n])
    assert not res.exact


def test_gradinit_needs_data():
    with pytest.raises(ProgtrainConfigError, match="calibration data"):
        grow(tiny_model("gpt2"), intermediate_size=160, init="gradinit")
    with pytest.raises(ProgtrainConfigError, match="optimizer"):
        gradinit_(tiny_model("gpt2"), [{"input_ids": torch.ones(1, 4, dtype=torch.long)}], optimizer="lamb")
