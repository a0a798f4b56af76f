"""The shared conformance suite (issue 16, item 2), after transformers' ``ModelTesterMixin``: every
registered adapter (``progtrain.arch.registered_adapters()``) declares its tiny test configs
(``ArchAdapter.tiny_configs``: tied and untied heads, biases, GQA ratios where the family has them)
and this one parametrised suite runs every growth operator on every one of them. No family is named
here: the operators come from the config's sizes, and what each growth should give (exact,
approximate or refused) from the adapter's data (pre- or post-norm, a norm epsilon that can follow
the width, where q/k are normalised, options that fix a size) and the growth plan's sizes.

Checked, per family x tiny config x operator:

- exactness: ``grow()``'s label is the measured deviation (<= 1e-5 relative in fp32) and agrees with
  what the adapter's data predicts; an exact growth's logits match the source's on a batch of our own;
- the grown config passes its class's validation (``config.validate()``, a dict round trip) and
  keeps the planned sizes;
- save (``progtrain.io.save_checkpoint``) and reload with plain transformers' auto class, with
  ``output_loading_info=True``: no missing, unexpected or mismatched keys, the same class, sizes and
  outputs (every operator on each family's first config; the combined growth on every other config
  and on the base model);
- causal LMs: greedy ``generate()`` with the KV cache (left-padded batch, 12 new tokens) gives the
  small model's tokens, and its per-step logits within the tolerance, after every exact operator on
  the family's first (smallest) causal config; encoder-only configs (masked LM) compare masked-LM
  logits on a right-padded batch with mask tokens instead;
- the grown model gives the same logits under ``attn_implementation="eager"`` and ``"sdpa"`` (every
  config, combined growth); a class without sdpa (``_supports_sdpa`` False) is skipped with that reason.

Adding a family = an adapter module with its ``tiny_configs``; this file does not change.
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

import pytest
import torch
import transformers

from progtrain import grow
from progtrain.arch import get_adapter, has_tied_head, registered_adapters
from progtrain.arch.base import TINY_TASKS, ArchAdapter, TinyConfig
from progtrain.errors import UnsupportedArchitectureError
from progtrain.growth import plan_growth
from progtrain.growth.spec import PLACEMENTS
from progtrain.io import save_checkpoint
from progtrain.verify import measure_deviation
from tiny_models import perturb

TOL = 1e-5  # max |delta logits| relative to max |logits|, fp32


def build(adapter: ArchAdapter, tiny: TinyConfig, head: bool = True, seed: int = 0) -> transformers.PreTrainedModel:
    """A perturbed (norm gains and biases off their init values) model of a tiny config, in eval mode:
    the task's auto class, or the base model (``AutoModel``) when ``head`` is False."""
    config = transformers.AutoConfig.for_model(adapter.model_types[0], **tiny.config)
    auto = getattr(transformers, TINY_TASKS[tiny.task]) if head else transformers.AutoModel
    torch.manual_seed(seed)
    return perturb(auto.from_config(config)).eval()


def auto_class(tiny: TinyConfig, head: bool):
    return getattr(transformers, TINY_TASKS[tiny.task]) if head else transformers.AutoModel


def operators(adapter: ArchAdapter, config) -> dict[str, dict]:
    """Every operator, sized from the config: width x2 and x1.5, query heads x2 (with the width where
    head_dim is hidden / heads), key/value heads x2 (GQA configs), FFN x2.5, depth x2 with each
    placement, a fresh (zero_out) and a plain copied layer, and all sizes at once."""
    s = adapter.read_sizes(config)
    widen = dict(hidden_size=2 * s.hidden)  # keeps head_dim where it is hidden / heads
    ops = {
        "width_x2": dict(hidden_size=2 * s.hidden),
        "width_x1.5": dict(hidden_size=3 * s.hidden // 2),
        "heads_x2": dict(num_heads=2 * s.heads, **({} if adapter.head_dim_is_free() else widen)),
        "ffn_x2.5": dict(intermediate_size=5 * s.ffn // 2),
    }
    if adapter.config_keys.get("kv_heads") and s.kv_heads < s.heads:
        ops["kv_heads_x2"] = dict(num_kv_heads=2 * s.kv_heads)
    for placement in PLACEMENTS:
        ops[f"depth_{placement}"] = dict(num_layers=2 * s.layers, layer_placement=placement)
    ops["depth_indices"] = dict(num_layers=2 * s.layers, layer_placement=[0, 2 * s.layers - 1])
    ops["depth_zero_out"] = dict(num_layers=s.layers + 1, depth_init="zero_out")
    ops["depth_copy"] = dict(num_layers=s.layers + 1, depth_init="copy")  # SOLAR-style: approximate
    ops["all"] = dict(hidden_size=2 * s.hidden, num_heads=2 * s.heads, intermediate_size=3 * s.ffn,
                      num_layers=2 * s.layers)
    return ops


def expected_outcome(adapter: ArchAdapter, config, kw: dict) -> tuple[str, object]:
    """``("refused", None)`` when the plan refuses the growth, else ``("exact" | "approximate", plan)``
    from the adapter's data: a plain layer copy is approximate; a post-norm family is approximate
    under non-integer widening and depth growth, a family whose norm epsilon is no config key under
    non-integer widening, a family that normalises q/k over the whole projection when query heads
    are added; everything else is exact."""
    try:
        plan = plan_growth(config, kw)
    except UnsupportedArchitectureError:
        return "refused", None
    src, tgt = plan.source_sizes, plan.target_sizes
    non_integer = tgt.hidden % src.hidden != 0
    depth = tgt.layers != src.layers
    approximate = (
        kw.get("depth_init") == "copy"
        or (not adapter.pre_norm and (non_integer or depth))
        or (not adapter.config_keys.get("norm_eps") and non_integer)
        or (adapter.qk_norm == "projection" and tgt.heads != src.heads)
    )
    return ("approximate" if approximate else "exact"), plan


@dataclasses.dataclass(frozen=True)
class Case:
    adapter: ArchAdapter
    tiny: TinyConfig
    first: bool  # the family's first tiny config
    head: bool
    op: str
    kw: dict
    outcome: str
    target: object  # the planned Sizes (None when refused)

    @property
    def id(self) -> str:
        return f"{self.adapter.name}-{self.tiny.name}{'' if self.head else '-base'}-{self.op}"


def _cases() -> list[Case]:
    out = []
    for family in registered_adapters():
        for i, tiny in enumerate(family.tiny_configs):
            config = transformers.AutoConfig.for_model(family.model_types[0], **tiny.config)
            adapter = get_adapter(config)  # the adapter of this config (layouts that depend on it)
            for head in (True, False) if i == 0 else (True,):
                for op, kw in operators(adapter, config).items():
                    outcome, plan = expected_outcome(adapter, config, kw)
                    out.append(Case(adapter, tiny, i == 0, head, op, kw, outcome, plan and plan.target_sizes))
    return out


CASES = _cases()


def _outputs(model, **inputs) -> torch.Tensor:
    with torch.no_grad():
        o = model(**inputs)
    return o.logits if getattr(o, "logits", None) is not None else o.last_hidden_state


def _assert_close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    rel = float((got - want).abs().max() / want.abs().max())
    assert rel <= TOL, f"{what}: max |delta| / max |ref| = {rel:.3g} > {TOL}"


# ---------------------------------------------------------------------- the registry declares the configs
@pytest.mark.parametrize("adapter", registered_adapters(), ids=lambda a: a.name)
def test_every_family_declares_tiny_configs_that_cover_its_variants(adapter):
    """Each adapter declares tiny configs of its own model type, with tied and untied heads, and with
    plain and grouped key/value heads where the family has them."""
    assert adapter.tiny_configs, f"{adapter.name} declares no tiny_configs"
    assert len({t.name for t in adapter.tiny_configs}) == len(adapter.tiny_configs)
    models = [build(adapter, t) for t in adapter.tiny_configs]
    assert all(get_adapter(m).name == adapter.name for m in models)
    assert {has_tied_head(m) for m in models} == {True, False}
    if adapter.config_keys.get("kv_heads"):
        sizes = [adapter.read_sizes(m.config) for m in models]
        assert {s.kv_heads == s.heads for s in sizes} == {True, False}


# ---------------------------------------------------------------------- every operator on every config
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_operator(case):
    model = build(case.adapter, case.tiny, case.head)
    if case.outcome == "refused":
        # refused before a tensor is built, naming a declared option that fixes a size
        with pytest.raises(UnsupportedArchitectureError) as err:
            grow(model, **case.kw)
        fixing = [a for a, o in case.adapter.config_options.items() if o.fixes and getattr(model.config, a, None)]
        assert fixing and any(f"config.{a}=" in str(err.value) for a in fixing), str(err.value)
        return
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = grow(model, **case.kw, seed=1)
    dev = res.deviation
    assert res.exact is (case.outcome == "exact"), (dev, res.notes)
    if res.exact:
        assert dev["rel"] <= TOL, dev
    else:
        assert dev["rel"] > TOL and res.notes, (dev, res.notes)
    ids = torch.randint(3, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    if case.head and res.exact:  # the label against a forward pass of our own, outside progtrain.verify
        _assert_close(_outputs(res.model, input_ids=ids), _outputs(model, input_ids=ids), "grown vs source")
    elif not case.head:  # hidden states are wider: folded back through the growth maps
        again = measure_deviation(model, res.model, maps=res.maps, seed=1)
        assert again["max_abs"] == pytest.approx(dev["max_abs"], rel=1e-6, abs=1e-12)
    assert type(res.model) is type(model)
    assert res.target_sizes == case.target == case.adapter.read_sizes(res.model.config)

    # the grown config passes its class's validation and survives a dict round trip with its sizes
    config = res.model.config
    config.validate()
    again_cfg = type(config).from_dict(config.to_dict())
    again_cfg.validate()
    assert case.adapter.read_sizes(again_cfg) == case.target

    assert sum(p.numel() for p in res.model.parameters()) > sum(p.numel() for p in model.parameters())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the source is untouched

    if (case.first and case.head) or case.op == "all":
        with tempfile.TemporaryDirectory() as tmp:  # not a tmp_path fixture: most cases need no directory
            save_checkpoint(res.model, Path(tmp) / "grown", history=[res.record])
            loaded, info = auto_class(case.tiny, case.head).from_pretrained(Path(tmp) / "grown",
                                                                            output_loading_info=True)
        bad = {k: sorted(v) for k, v in info.items() if k != "error_msgs" and v}
        assert not bad and not info["error_msgs"], bad or info["error_msgs"]
        assert type(loaded) is type(res.model)
        assert case.adapter.read_sizes(loaded.config) == case.target
        _assert_close(_outputs(loaded.eval(), input_ids=ids), _outputs(res.model, input_ids=ids), "reloaded")


# ---------------------------------------------------------------------- generation / encoder outputs
def _first(adapter: ArchAdapter, task: str) -> TinyConfig | None:
    return next((t for t in adapter.tiny_configs if t.task == task), None)


GEN_CASES = [c for c in CASES if c.head and c.outcome == "exact" and c.tiny is _first(c.adapter, c.tiny.task)]


def _padded_batch(config, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Two rows of random tokens (ids >= 3, clear of the usual special ids), the first padded by 2."""
    ids = torch.randint(3, config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    pad = slice(0, 2) if left else slice(5, 7)
    mask[0, pad] = 0
    ids[0, pad] = config.pad_token_id if config.pad_token_id is not None else 0
    return ids, mask


@pytest.mark.parametrize("case", GEN_CASES, ids=[c.id for c in GEN_CASES])
def test_exact_growth_keeps_generation_or_encoder_outputs(case):
    """Causal LM: greedy generate() with the KV cache (each grown layer must use its own cache slot)
    gives the small model's tokens and per-step logits. Masked LM (encoder-only, no generate()): the
    masked-LM logits of a right-padded batch with mask tokens are the small model's."""
    model = build(case.adapter, case.tiny)
    res = grow(model, **case.kw, seed=1)
    assert res.exact, res.notes
    config = model.config
    if case.tiny.task == "masked-lm":
        ids, mask = _padded_batch(config, left=False)
        if getattr(config, "mask_token_id", None) is not None:
            ids[:, 1] = config.mask_token_id
        keep = mask.bool()
        _assert_close(_outputs(res.model, input_ids=ids, attention_mask=mask)[keep],
                      _outputs(model, input_ids=ids, attention_mask=mask)[keep], "masked-LM logits")
        return
    ids, mask = _padded_batch(config, left=True)
    kw = dict(attention_mask=mask, max_new_tokens=12, do_sample=False, use_cache=True, eos_token_id=None,
              pad_token_id=ids[0, 0].item(), output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        want, got = model.generate(ids, **kw), res.model.generate(ids, **kw)
    assert torch.equal(got.sequences, want.sequences)
    _assert_close(torch.stack(got.logits), torch.stack(want.logits), "generation logits")


# ---------------------------------------------------------------------- eager vs sdpa
SDPA_CASES = [c for c in CASES if c.head and c.outcome != "refused"
              and c.op == next(o for o in ("all", "ffn_x2.5") if any(
                  d.op == o and d.outcome != "refused" for d in CASES if d.tiny is c.tiny and d.head))]


@pytest.mark.parametrize("case", SDPA_CASES, ids=[c.id for c in SDPA_CASES])
def test_grown_model_same_logits_eager_and_sdpa(case):
    """The grown model's logits on a padded batch (left-padded for causal LMs) under eager and sdpa
    attention, at the unpadded positions."""
    model = build(case.adapter, case.tiny)
    cls = type(model)
    if not cls._supports_sdpa:  # transformers 5: class attribute of every PreTrainedModel
        pytest.skip(f"{cls.__name__}._supports_sdpa is False: transformers has no sdpa attention for it")
    grown = grow(model, **case.kw, seed=1).model
    ids, mask = _padded_batch(model.config, left=case.tiny.task == "causal-lm")
    grown.set_attn_implementation("eager")
    eager = _outputs(grown, input_ids=ids, attention_mask=mask)
    grown.set_attn_implementation("sdpa")
    assert grown.config._attn_implementation == "sdpa"
    sdpa = _outputs(grown, input_ids=ids, attention_mask=mask)
    keep = mask.bool()
    _assert_close(sdpa[keep], eager[keep], "sdpa vs eager")
