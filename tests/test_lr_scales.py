"""Birth stages, LR-adaptation scales and the update scaler (progtrain.train.lr_scales)."""

import copy

import pytest
import torch

from progtrain import grow
from progtrain.errors import ProgtrainConfigError
from progtrain.train.distributed import zero_param_hooks
from progtrain.train.lr_scales import UpdateScaler, compute_lr_scales, update_birth_stages
from tiny_models import tiny_model


@pytest.fixture(scope="module")
def two_stage():
    """A tiny GPT-2 grown twice (FFN 128 -> 192, then hidden 32 -> 40 and FFN -> 256) with births."""
    m0 = tiny_model("gpt2")
    b0 = update_birth_stages(None, m0, None, 0)
    r1 = grow(m0, intermediate_size=192, verify=False)
    b1 = update_birth_stages(b0, r1.model, r1.param_maps, 1)
    r2 = grow(r1.model, intermediate_size=256, hidden_size=40, verify=False, seed=1)
    b2 = update_birth_stages(b1, r2.model, r2.param_maps, 2)
    return m0, b0, r1, b1, r2, b2


def test_birth_stages_follow_the_growth(two_stage):
    m0, b0, r1, b1, r2, b2 = two_stage
    assert all(int(b.abs().sum()) == 0 for b in b0.values())
    for name, pmap in r1.param_maps.items():
        assert torch.equal(b1[name] == 1, pmap.born_mask()), name
    # the second growth copies nothing (FFN and hidden are padded), so stage-1 elements are carried
    # one-to-one: their count is conserved; every newly born element is stage 2
    n1 = sum(int((b == 1).sum()) for b in b1.values())
    assert n1 > 0 and sum(int((b == 1).sum()) for b in b2.values()) == n1
    for name, pmap in r2.param_maps.items():
        assert torch.equal(b2[name] == 2, pmap.born_mask()), name
        assert b2[name].dtype == torch.int8


def _expected_ratio(model, births, part, stage):
    """||W_stage||_F / ||W_0||_F over every parameter whose name contains ``part`` (one role: weight
    and bias of a module)."""
    num = den = 0.0
    for n, p in model.named_parameters():
        if part in n:
            w = p.detach().double()
            num += float(w[births[n] == stage].pow(2).sum())
            den += float(w[births[n] == 0].pow(2).sum())
    return (num / den) ** 0.5


def test_scales_are_norm_ratios_per_role(two_stage):
    *_, r2, b2 = two_stage
    model = r2.model
    s = compute_lr_scales(model, b2, clamp=(0.0, 100.0))
    for part in ("mlp.c_fc.", "attn.c_attn."):
        for stage in (1, 2):
            want = _expected_ratio(model, b2, part, stage)
            for n in s:
                if part in n and bool((b2[n] == stage).any()):
                    got = s[n][b2[n] == stage]
                    assert torch.allclose(got, torch.full_like(got, want), rtol=1e-6), (n, stage)
    for n in s:
        assert bool((s[n][b2[n] == 0] == 1).all())
    inv = compute_lr_scales(model, b2, mode="inverse_norm_ratio", clamp=(0.0, 100.0))
    n = "transformer.h.0.mlp.c_fc.weight"
    assert torch.allclose(inv[n][b2[n] == 1] * s[n][b2[n] == 1], torch.ones(1), rtol=1e-6)
    # zero fan-out columns born at stage 2 (c_proj of new units) have norm 0 -> lower clamp
    lo = compute_lr_scales(model, b2, clamp=(0.25, 4.0))
    n = "transformer.h.0.mlp.c_proj.weight"
    assert bool((lo[n][b2[n] == 2] == 0.25).all())
    assert all(bool((t == 1).all()) for t in compute_lr_scales(model, b2, mode="off").values())


def _grads(model, seed):
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype)


@pytest.mark.parametrize("opt_name", ["adamw", "sgd"])
def test_update_is_scaled_per_element(two_stage, opt_name):
    """Scaled update == scale * plain update for every element (AdamW with weight decay, SGD with
    momentum), and the scaler leaves unscaled parameters exactly as the plain optimizer does."""
    *_, r2, b2 = two_stage
    base = copy.deepcopy(r2.model).double().train()
    scales = compute_lr_scales(base, b2, clamp=(0.05, 20.0))
    make = {
        "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1),
        "sgd": lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9, weight_decay=0.01),
    }[opt_name]
    plain, scaled = copy.deepcopy(base), copy.deepcopy(base)
    opt_p, opt_s = make(plain.parameters()), make(scaled.parameters())
    scaler = UpdateScaler(opt_s, dict(scaled.named_parameters()), scales)
    _grads(plain, 0)
    _grads(scaled, 0)
    p0 = {n: p.detach().clone() for n, p in plain.named_parameters()}
    opt_p.step()
    scaler.step()
    plain_now = dict(plain.named_parameters())
    for n, p in scaled.named_parameters():
        du_plain = plain_now[n].detach() - p0[n]
        du = p.detach() - p0[n]
        assert torch.allclose(du, scales[n].double() * du_plain, rtol=1e-9, atol=1e-15), n


def test_one_adamw_step_ratio_born_over_stage0(two_stage):
    """Acceptance: first AdamW step with equal gradient magnitudes; |update| of born-at-stage-1
    elements / |update| of stage-0 elements == the configured (clamped norm) ratio within 1e-6."""
    m0, b0, r1, b1, *_ = two_stage
    model = copy.deepcopy(r1.model).double().train()
    scales = compute_lr_scales(model, b1)
    want = min(max(_expected_ratio(model, b1, "mlp.c_fc.", 1), 0.1), 10.0)
    lr = 1e-3
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, eps=1e-16)
    named = dict(model.named_parameters())
    g = torch.Generator().manual_seed(0)
    for p in model.parameters():  # |g| = 1 everywhere, random signs: every raw Adam update is lr
        p.grad = torch.randint(0, 2, p.shape, generator=g).double() * 2 - 1
    before = {n: p.detach().clone() for n, p in named.items()}
    UpdateScaler(opt, named, scales).step()
    n = "transformer.h.1.mlp.c_fc.weight"
    upd = (named[n].detach() - before[n]).abs()
    ratio = upd[b1[n] == 1].mean() / upd[b1[n] == 0].mean()
    assert abs(float(ratio) - want) <= 1e-6 * want
    assert float(upd[b1[n] == 1].max() - upd[b1[n] == 1].min()) <= 1e-6 * lr  # uniform within the stage
    assert torch.allclose(upd[b1[n] == 0], torch.full((), lr, dtype=torch.float64), rtol=1e-9)


def test_param_hooks_read_and_write_the_optimizer_copy():
    """The scaler reads/writes through get_param/set_param (as DeepSpeed's fp32 partitions need):
    here the optimizer updates separate fp32 master copies while the module holds bf16 weights."""
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 4).to(torch.bfloat16)
    named = dict(model.named_parameters())
    master = {id(p): p.detach().float().clone().requires_grad_(True) for p in named.values()}
    opt = torch.optim.AdamW(list(master.values()), lr=1e-2, weight_decay=0.0)
    for m in master.values():
        m.grad = torch.ones_like(m)
    scales = {"weight": torch.linspace(0.0, 2.0, 24).view(4, 6)}
    calls = {"get": 0, "set": 0}

    def get_param(p):
        calls["get"] += 1
        return master[id(p)]

    def set_param(p, value):
        calls["set"] += 1
        master[id(p)].data.copy_(value)

    w_model = model.weight.detach().clone()
    w0 = master[id(model.weight)].detach().clone()
    b0 = master[id(model.bias)].detach().clone()
    UpdateScaler(opt, named, scales, get_param=get_param, set_param=set_param).step()
    assert calls == {"get": 2, "set": 1}  # the bias has no scale: never touched
    du = master[id(model.weight)].detach() - w0
    raw = -1e-2 / (1 + 1e-8)
    assert torch.allclose(du, scales["weight"] * raw, rtol=1e-5, atol=1e-8)
    assert torch.allclose(master[id(model.bias)].detach() - b0, torch.full((4,), raw), rtol=1e-5)
    assert torch.equal(model.weight.detach(), w_model)  # module weights are the caller's business


def test_zero_hooks_write_the_fp32_partition_and_the_module_param():
    """zero_param_hooks() through DeepSpeed's own safe_get/safe_set functions, on parameters that
    carry a ZeRO-1/2 style high-precision mapping (here: a plain fp32 tensor standing in for the
    flat partition)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 3).to(torch.bfloat16)
    masters = {}
    for name, p in model.named_parameters():
        hp = p.detach().float().clone().requires_grad_(True)
        masters[name] = hp
        p._hp_mapping = True
        p.get_full_hp_param = lambda hp=hp: hp.detach().clone()
        p.set_full_hp_param = lambda v, hp=hp: hp.data.copy_(v)
    opt = torch.optim.SGD(list(masters.values()), lr=0.5)
    for hp in masters.values():
        hp.grad = torch.ones_like(hp)
    w0 = masters["weight"].detach().clone()
    scales = {"weight": torch.full((3, 5), 0.25), "bias": torch.full((3,), 2.0)}
    get_param, set_param = zero_param_hooks()
    UpdateScaler(opt, dict(model.named_parameters()), scales, get_param=get_param, set_param=set_param).step()
    assert torch.allclose(masters["weight"].detach() - w0, torch.full((3, 5), -0.5 * 0.25))
    assert torch.equal(model.weight.detach(), masters["weight"].detach().to(torch.bfloat16))
    zero3 = torch.nn.Parameter(torch.zeros(2))
    zero3.ds_id = 0
    with pytest.raises(ProgtrainConfigError, match="ZeRO-3"):
        get_param(zero3)


def test_bad_input_is_a_config_error(two_stage):
    m0, b0, r1, b1, *_ = two_stage
    with pytest.raises(ProgtrainConfigError, match="mode"):
        compute_lr_scales(r1.model, b1, mode="sideways")
    with pytest.raises(ProgtrainConfigError, match="clamp"):
        compute_lr_scales(r1.model, b1, clamp=(2.0, 1.0))
    with pytest.raises(ProgtrainConfigError, match="another model|do not match"):
        compute_lr_scales(r1.model, b0)
    with pytest.raises(ProgtrainConfigError, match="outside"):
        update_birth_stages(None, m0, None, 200)
    with pytest.raises(ProgtrainConfigError, match="unknown parameters"):
        UpdateScaler(torch.optim.SGD(m0.parameters(), lr=0.1), dict(m0.named_parameters()), {"nope": torch.ones(1)})
