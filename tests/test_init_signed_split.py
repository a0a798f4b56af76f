"""signed_split: matrix-free splitting matrices, predicted vs realised loss change, signed splits
that escape splitting-stable points."""

import copy

import pytest
import torch
from torch import nn

from progtrain.growth import grow
from progtrain.growth.calibration import calibration_batches
from progtrain.init.signed_split import (
    FFNLayer,
    SplittingOperator,
    _ParamsRequireGrad,
    apply_splits,
    ffn_pass,
    find_ffn_layers,
    plan_splits,
)
from tiny_models import tiny_model


def mean_loss(model, batches, loss_fn=None):
    with torch.no_grad():
        if loss_fn is None:
            return sum(float(model(**b).loss) for b in batches) / len(batches)
        return sum(float(loss_fn(model, b)) for b in batches) / len(batches)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_matrix_free_sv_equals_explicit_splitting_matrix(family):
    model = tiny_model(family).double()
    batches = calibration_batches(model, None, n_batches=2, batch_size=2, seq_len=16, seed=1)
    layer = find_ffn_layers(model)[1]
    if family == "gpt2":
        act = model.transformer.h[1].mlp.act
        unit = lambda th, x: act(x @ th[:-1] + th[-1])  # noqa: E731  theta = [c_fc column, bias]
    else:
        act = model.model.layers[1].mlp.act_fn
        d = model.config.hidden_size
        unit = lambda th, x: act(x @ th[:d]) * (x @ th[d:])  # noqa: E731  theta = [gate row, up row]
    g = torch.Generator().manual_seed(0)
    with _ParamsRequireGrad(model):
        op = SplittingOperator(model, [layer], batches)
        theta = layer.rows([p.detach() for p in layer.fan_in_params()])
        V = torch.randn(theta.shape, generator=g, dtype=theta.dtype)
        Sv = op.matvec([V])[0]
        passes = [ffn_pass(model, [layer], b) for b in batches]
    for i in [0, 7, 33, layer.n_units - 1]:
        # the explicit d x d splitting matrix of unit i: Hessian (double backward) of sum_t c_t sigma(theta; x_t)
        S = 0
        for fp in passes:
            x = fp.h[0].reshape(-1, fp.h[0].shape[-1])
            c = fp.da[0].reshape(-1, layer.n_units)[:, i]
            S = S + torch.autograd.functional.hessian(lambda th: (c * unit(th, x)).sum(), theta[i])
        S = S / len(passes)
        assert S.shape[0] == theta.shape[1]
        torch.testing.assert_close(Sv[i], S @ V[i], atol=1e-5, rtol=0)
        assert float(S.norm()) > 1e-4  # a real, non-trivial matrix


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_realised_loss_change_matches_prediction(family):
    model = tiny_model(family).double()
    batches = calibration_batches(model, None, n_batches=2, batch_size=4, seq_len=32, seed=2)
    n_ffn = model.config.n_inner or 4 * model.config.n_embd if family == "gpt2" else model.config.intermediate_size
    before = mean_loss(model, batches)
    res = grow(model, intermediate_size=n_ffn + 8, init="signed_split", init_kwargs={"eps": 0.01}, data=batches)
    rep = res.record["strategy_report"]["signed_split"]
    predicted = rep["predicted_total"]
    realised = mean_loss(res.model, batches) - before
    assert predicted < 0 and realised < 0
    assert abs(realised - predicted) <= 0.1 * abs(predicted), (realised, predicted)
    for info in rep["layers"].values():  # per-unit predictions exposed, 8 units split into the 8 new slots
        assert len(info["predicted_per_unit"]) == n_ffn and len(info["split_units"]) == 8
        assert info["into_slots"] == list(range(n_ffn, n_ffn + 8))
    assert not res.exact and "signed_split" in res.notes[-1]


class MLP(nn.Module):
    """x -> down(gelu(up(x))) with 4 trained units and 4 empty slots (zero fan-in and fan-out)."""

    def __init__(self, d=6, units=4, slots=4, out=3):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.up = nn.Linear(d, units + slots).double()
        self.down = nn.Linear(units + slots, out).double()
        self.act = nn.GELU()
        with torch.no_grad():
            self.up.weight.copy_(torch.randn(units + slots, d, generator=g) * 0.15)
            self.up.bias.copy_(torch.randn(units + slots, generator=g) * 0.1)
            self.down.weight.copy_(torch.rand(out, units + slots, generator=g) + 0.5)  # positive fan-out
            self.up.weight[units:] = 0
            self.up.bias[units:] = 0
            self.down.weight[:, units:] = 0

    def forward(self, x):
        return self.down(self.act(self.up(x)))

    def layer(self, units=4, slots=4):
        return FFNLayer("mlp", [("up.weight", self.up.weight, 0, False), ("up.bias", self.up.bias, 0, False)],
                        [self.up], self.down, "down.weight", self.down.weight, 1, torch.arange(units, units + slots))


def linear_readout(model, batch):
    return model(batch["x"]).sum(-1).mean()


def test_signed_split_escapes_splitting_stable_point():
    # dL/da > 0 (positive fan-out, linear readout) and gelu'' > 0 on |z| < sqrt(2): every S_i is PSD
    g = torch.Generator().manual_seed(1)
    batches = [{"x": torch.randn(64, 6, generator=g, dtype=torch.float64)} for _ in range(2)]
    base = MLP()
    z = torch.cat([base.up(b["x"]) for b in batches]).detach()
    assert float(z.abs().max()) < 2**0.5
    loss0 = mean_loss(base, batches, linear_readout)

    plans = plan_splits(base, [base.layer()], batches, eps=0.05, lanczos_steps=7, loss_fn=linear_readout)
    P = plans[0]
    assert float(P.lambda_min.min()) >= -1e-12  # splitting-stable everywhere
    assert float(P.lambda_max.min()) > 0

    # no positive split lowers the loss: best direction v_min, and random directions, per unit
    for j in range(4):
        for direction in [P.v_min[j], torch.randn(7, generator=g, dtype=torch.float64)]:
            m = copy.deepcopy(base)
            layer = m.layer(slots=1)
            Q = copy.copy(P)
            Q.layer = layer
            Q.v_min = P.v_min.clone()
            Q.v_min[j] = direction / direction.norm()
            Q.predicted_signed = torch.full_like(P.predicted_signed, float("inf"))  # force the positive split
            Q.chosen = torch.tensor([j])
            apply_splits(Q)
            assert mean_loss(m, batches, linear_readout) - loss0 >= -1e-12

    # the signed split (negative output weight along v_max) does lower it, as predicted
    assert bool(P.signed()[P.chosen].all()) and float(P.predicted[P.chosen].sum()) < 0
    m = copy.deepcopy(base)
    Q = copy.copy(P)
    Q.layer = m.layer()
    apply_splits(Q)
    realised = mean_loss(m, batches, linear_readout) - loss0
    predicted = float(P.predicted[P.chosen].sum())
    assert realised < 0
    assert abs(realised - predicted) <= 0.1 * abs(predicted), (realised, predicted)
    assert float(m.down.weight.detach()[:, 4:].min()) < 0  # the copies carry negative output weights
