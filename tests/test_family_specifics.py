"""What each newer family adds to the maths, checked tensor by tensor (issue 16): Qwen3's per-head
q/k norms, Phi-3's fused [q|k|v] (GQA) and [gate|up] layouts, Granite's multipliers."""

import math

import pytest
import torch
import transformers as T

from progtrain import grow
from progtrain.arch import get_adapter
from tiny_models import LLAMA_LIKE_TINY, perturb, tiny_model

TOL = 1e-5  # max |dlogits| relative to max |logits|, fp32


# ---------------------------------------------------------------------- Qwen3: per-head q/k norms
def _qwen3(eps: float):
    torch.manual_seed(0)
    cfg = T.Qwen3Config(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                        intermediate_size=64, num_hidden_layers=2, vocab_size=101, rms_norm_eps=eps)
    return perturb(T.Qwen3ForCausalLM(cfg)).eval()


def test_qwen3_non_integer_widening_gives_qk_norms_their_epsilon_back():
    """48/32 widening scales rms_norm_eps by 2/3, which the q/k norms share: their input rows are
    scaled by sqrt(2/3), which a norm divides out except against the epsilon."""
    model = _qwen3(eps=0.5)  # a large epsilon makes a missed compensation visible (2e-3 measured)
    res = grow(model, hidden_size=48, symmetry_noise=0.0)
    assert res.model.config.rms_norm_eps == pytest.approx(0.5 * 32 / 48)
    c = math.sqrt(32 / 48)
    old, new = model.model.layers[0].self_attn, res.model.model.layers[0].self_attn
    for proj in ("q_proj", "k_proj"):
        assert torch.allclose(getattr(new, proj).weight[:, :32], getattr(old, proj).weight * c, atol=1e-7)
    assert torch.equal(new.v_proj.weight[:, :32], old.v_proj.weight)  # no norm after v: untouched
    assert torch.equal(new.q_norm.weight, old.q_norm.weight)  # head_dim-sized, never grows
    assert res.exact and res.deviation["rel"] <= TOL


def test_qwen3_head_growth_shares_the_per_head_norm():
    model = _qwen3(eps=1e-6)
    res = grow(model, num_heads=8, num_kv_heads=4)
    layer = res.model.model.layers[1].self_attn
    assert layer.q_norm.weight.shape == (8,) and layer.q_proj.weight.shape == (64, 32)
    assert res.exact and res.deviation["rel"] <= TOL


# ---------------------------------------------------------------------- Phi-3: fused layouts
def test_phi3_fused_qkv_keeps_each_part_with_gqa():
    """[q|k|v] with 4 query / 2 kv heads (head_dim 8) grown to 8 / 4 at width 64: old q heads keep
    their kv heads, and the k and v parts are found at their own (kv-sized) offsets."""
    model = tiny_model("phi3", kv=2)
    res = grow(model, hidden_size=64, num_heads=8, num_kv_heads=4, symmetry_noise=0.0)
    old = model.model.layers[0].self_attn.qkv_proj.weight  # (32 + 16 + 16, 32)
    new = res.model.model.layers[0].self_attn.qkv_proj.weight  # (64 + 32 + 32, 64)
    assert new.shape == (128, 64)
    q_old, k_old, v_old = old[:32], old[32:48], old[48:]
    q_new, k_new, v_new = new[:64], new[64:96], new[96:]
    hd = 8
    for h2, h in enumerate(res.maps.q_src):
        if h >= 0:  # tiled width: each old fan-in column split in two halves
            assert torch.allclose(q_new[h2 * hd:(h2 + 1) * hd, :32] * 2, q_old[h * hd:(h + 1) * hd], atol=1e-6)
    for g2, g in enumerate(res.maps.kv_src):
        if g >= 0:
            assert torch.allclose(k_new[g2 * hd:(g2 + 1) * hd, :32] * 2, k_old[g * hd:(g + 1) * hd], atol=1e-6)
            assert torch.allclose(v_new[g2 * hd:(g2 + 1) * hd, :32] * 2, v_old[g * hd:(g + 1) * hd], atol=1e-6)
    assert res.exact and res.deviation["rel"] <= TOL


def test_phi3_fused_gate_up_grows_both_halves():
    model = tiny_model("phi3")
    res = grow(model, intermediate_size=96)
    old = model.model.layers[0].mlp.gate_up_proj.weight  # (2 * 64, 32)
    new = res.model.model.layers[0].mlp.gate_up_proj.weight  # (2 * 96, 32)
    assert torch.equal(new[:64], old[:64])  # gate units stay in the gate half ...
    assert torch.equal(new[96:160], old[64:])  # ... and up units in the up half
    down = res.model.model.layers[0].mlp.down_proj.weight
    assert torch.equal(down[:, :64], model.model.layers[0].mlp.down_proj.weight)
    assert not down[:, 64:].any()  # new units write nothing yet
    assert new[64:96].any() and new[160:].any()  # ... but read the stream (free rows, initialised)
    assert res.exact and res.deviation["rel"] <= TOL


# ---------------------------------------------------------------------- Granite: multipliers
MULTIPLIERS = ("embedding_multiplier", "residual_multiplier", "attention_multiplier", "logits_scaling")


@pytest.mark.parametrize("growth", [dict(hidden_size=64), dict(hidden_size=48), dict(hidden_size=64, num_heads=8),
                                    dict(num_kv_heads=4), dict(intermediate_size=96), dict(num_layers=4)])
def test_granite_keeps_its_multipliers_and_the_function(growth):
    """The multipliers are fixed numbers, not functions of the width: the grown model keeps them and
    computes the same logits; the adapter's attention-scale law is attention_multiplier."""
    model = tiny_model("granite", kv=2)
    cfg = model.config
    assert [getattr(cfg, m) for m in MULTIPLIERS] == [12.0, 0.22, 0.0625, 8.0]
    res = grow(model, **growth)
    assert [getattr(res.model.config, m) for m in MULTIPLIERS] == [getattr(cfg, m) for m in MULTIPLIERS]
    assert get_adapter(cfg).attention_scale(cfg, 0, 8) == 0.0625
    assert res.maps.q_scale == [1.0] * res.target_sizes.layers
    assert res.exact and res.deviation["rel"] <= TOL, res.notes


def test_granite_multipliers_matter():
    """The tiny Granite's multipliers change its function (so the exactness above is not vacuous)."""
    model = tiny_model("granite", kv=2)
    plain = T.GraniteForCausalLM(T.GraniteConfig(**{**model.config.to_dict(), **dict.fromkeys(MULTIPLIERS, 1.0)}))
    plain.load_state_dict(model.state_dict())
    ids = torch.randint(0, 101, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = model(ids).logits, plain.eval()(ids).logits
    assert (a - b).abs().max() > 0.1 * a.abs().max()


# ---------------------------------------------------------------------- OLMo2: norms after the sub-layers, projection-wide q/k norms
def _olmo2(eps: float = 1e-5, kv: int = 2):
    torch.manual_seed(0)
    cfg = T.Olmo2Config(hidden_size=32, num_attention_heads=4, num_key_value_heads=kv, intermediate_size=64,
                        num_hidden_layers=2, vocab_size=101, pad_token_id=0, rms_norm_eps=eps)
    return perturb(T.Olmo2ForCausalLM(cfg)).eval()


@pytest.mark.parametrize("hidden", [64, 48, 40])
def test_olmo2_widening_keeps_heads_and_is_exact(hidden, tmp_path):
    """Widening writes head_dim into the config (Olmo2 reads it) so heads and rotary stay; the branch
    norms and the projection-wide q/k norms keep their outputs (q/k rows compensate the epsilon)."""
    model = _olmo2(eps=0.5)  # a large epsilon makes a missed compensation visible
    res = grow(model, hidden_size=hidden)
    cfg = res.model.config
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (4, 2, 8)
    assert res.model.model.layers[0].self_attn.q_norm.weight.shape == (32,)
    assert res.exact and res.deviation["rel"] <= TOL, res.notes
    cfg.save_pretrained(tmp_path)
    assert T.AutoConfig.from_pretrained(tmp_path).head_dim == 8


def test_olmo2_new_heads_are_reported_approximate_kv_copies_exact():
    model = _olmo2()
    res = grow(model, num_heads=8)  # new query heads enter the q norm's mean
    assert res.expected_exact is False and res.exact is False and res.deviation["rel"] > TOL
    assert any("normalises its query projection over all heads" in n for n in res.notes)
    res = grow(model, num_kv_heads=4)  # each kv head copied twice: the k norm's mean is unchanged
    assert res.maps.kv_src == [0, 0, 1, 1]
    assert res.expected_exact and res.exact and res.deviation["rel"] <= TOL


def test_olmo2_new_block_is_identity_through_its_post_norms():
    """A new block has zero o/down: the post-sub-layer RMSNorms see zero and write zero."""
    model = _olmo2()
    res = grow(model, num_layers=4, layer_placement="top")
    new = res.model.model.layers[3]
    assert not new.self_attn.o_proj.weight.any() and not new.mlp.down_proj.weight.any()
    assert new.post_attention_layernorm.weight.any()  # norms keep their gains (trainable, not dead)
    assert res.exact and res.deviation["rel"] <= TOL


# ---------------------------------------------------------------------- StableLM: per-head q/k LayerNorm modules
def _stablelm(**opts):
    torch.manual_seed(0)
    cfg = T.StableLmConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                           num_hidden_layers=2, vocab_size=101, qk_layernorm=True, **opts)
    return perturb(T.StableLmForCausalLM(cfg)).eval()


@pytest.mark.parametrize("parallel", [False, True])
def test_stablelm_qk_layernorm_keeps_each_head_norm_under_ffn_and_depth_growth(parallel):
    model = _stablelm(use_parallel_residual=parallel)
    res = grow(model, intermediate_size=96, num_layers=4, layer_placement=[1, 3])
    new, old = res.model.model.layers, model.model.layers
    for h in range(4):
        assert torch.equal(new[2].self_attn.q_layernorm.norms[h].weight, old[1].self_attn.q_layernorm.norms[h].weight)
        assert torch.equal(new[1].self_attn.q_layernorm.norms[h].weight, old[0].self_attn.q_layernorm.norms[h].weight)
    assert res.exact and res.deviation["rel"] <= TOL


def test_stablelm_qk_layernorm_refuses_head_changes_in_one_line(tmp_path, capsys):
    from progtrain.cli import main
    from progtrain.errors import UnsupportedArchitectureError

    model = _stablelm()
    for growth in (dict(hidden_size=64), dict(num_kv_heads=4)):
        with pytest.raises(UnsupportedArchitectureError, match="config.qk_layernorm=True fixes num_"):
            grow(model, **growth)
    src, out = tmp_path / "src", tmp_path / "out"
    model.save_pretrained(src)
    capsys.readouterr()
    code = main(["grow", str(src), str(out), "--hidden-size", "64"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "qk_layernorm" in err and "num_heads 4 -> 8" in err, err
    assert not out.exists()


# ---------------------------------------------------------------------- greedy generation with the KV cache
@pytest.mark.parametrize("family", list(LLAMA_LIKE_TINY))
def test_exact_growth_generates_the_same_tokens_with_the_kv_cache(family):
    """Width (non-integer), FFN and interleaved depth growth: greedy generate() with the KV cache (the
    grown layers' layer_idx must be their new indices) gives the source's tokens."""
    model = tiny_model(family)
    res = grow(model, hidden_size=48, intermediate_size=96, num_layers=4)
    assert res.exact, res.notes
    assert [layer.self_attn.layer_idx for layer in res.model.model.layers] == [0, 1, 2, 3]
    ids = torch.randint(3, 101, (2, 5), generator=torch.Generator().manual_seed(0))
    kw = dict(max_new_tokens=12, do_sample=False, use_cache=True, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        assert torch.equal(model.generate(ids, **kw), res.model.generate(ids, **kw))
