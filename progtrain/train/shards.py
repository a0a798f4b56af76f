"""Prepared data: the corpus tokenised once into memory-mapped token shards plus a manifest.

Layout of a prepared directory (``data.prepared_dir``, default ``OUTPUT_DIR/data``)::

    manifest.json          what was read (sources with sizes and mtimes), how (tokenizer hash,
                           seq_len, split settings) and what came out (blocks, tokens, docs, dtype)
    tokenizer/             the run's tokenizer (trained here when data.tokenizer is not given)
    train-00000.bin ...    raw token ids, ``[blocks, seq_len]`` row-major, dtype in the manifest
    val-00000.bin ...

Why raw numpy memmaps and not Arrow through ``datasets``: a training sample is a fixed-size block
of ``seq_len`` ids, so sample ``i`` is one slice at byte offset ``i * seq_len * itemsize``, read
with no index and no decoding; the files hold only the tokens, in the smallest unsigned dtype
that holds the vocabulary (``uint16`` below 65,536 tokens: half of Arrow's int32 lists, a quarter
of int64), and anyone can read them with one ``np.memmap`` line (the nanoGPT ``train.bin``
convention). ``datasets`` is still used where it is strong: reading the inputs and tokenising in
parallel processes (``Dataset.map(num_proc=...)``) through an Arrow cache on disk, so memory stays
bounded by one batch per process at any corpus size.

Preparing (:func:`prepare`):

1. documents are read in source order (:mod:`progtrain.train.sources`); document ``k`` is held out
   when :func:`~progtrain.train.sources.is_heldout` says so, until ``data.val_max_chars``
   characters are held out (so the split is by documents, even over the corpus, and bounded);
2. without ``data.tokenizer`` a byte-level BPE is trained on the first
   ``data.tokenizer_sample_chars`` characters of the *training* documents (never held-out ones);
3. documents are tokenised (in ``data.num_proc`` processes; ``data.streaming: true`` tokenises on
   the fly in this process instead, with no local copy of the text), each followed by the
   end-of-text (causal LM) or separator (masked LM) token, and the split's stream is cut into
   blocks of ``seq_len`` tokens (the tail that does not fill a block is dropped);
4. everything is written to a temporary directory renamed into place at the end
   (:func:`progtrain.io.atomic_dir`): a reader never sees half-prepared data.

A run (:func:`ensure_prepared`) prepares when the directory has no manifest, otherwise checks the
manifest against the config and refuses a mismatch with one line naming what changed.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from ..errors import ProgtrainConfigError
from .sources import Source, config_sources, fingerprint, is_heldout, iter_documents

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT = 1
SHARD_BYTES = 1 << 28  # 256 MiB per shard file


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned integer dtype that holds ids ``0 .. vocab_size - 1``."""
    for dt in (np.uint8, np.uint16, np.uint32):
        if vocab_size <= np.iinfo(dt).max + 1:
            return np.dtype(dt)
    return np.dtype(np.uint64)


def prepared_dir(cfg: Any, run_dir: str | os.PathLike | None = None) -> Path:
    """``data.prepared_dir``, or ``<run dir>/data`` (run dir: ``run_dir`` or ``cfg.output_dir``)."""
    if cfg.data.prepared_dir:
        return Path(os.path.expanduser(cfg.data.prepared_dir))
    return Path(run_dir or cfg.output_dir) / "data"


def tokenizer_hash(tok: Any) -> str:
    """sha256 of the tokenizer's full serialisation (model, merges, normalizer, ...) and special tokens."""
    h = hashlib.sha256()
    h.update(tok.backend_tokenizer.to_str().encode())
    h.update(json.dumps(tok.special_tokens_map, sort_keys=True, default=str).encode())
    return h.hexdigest()


def separator_id(tok: Any) -> int | None:
    """The id that ends a document: end-of-text, else the separator token."""
    return tok.eos_token_id if tok.eos_token_id is not None else tok.sep_token_id


def expected_spec(cfg: Any, sources: list[Source] | None = None) -> dict:
    """What a prepared directory must have been made from to serve ``cfg`` (compared key by key
    with the manifest's ``spec``)."""
    d = cfg.data
    sources = config_sources(d) if sources is None else sources
    if d.tokenizer:
        from .data import load_tokenizer_from

        tok_spec = {"path": d.tokenizer, "hash": tokenizer_hash(load_tokenizer_from(d.tokenizer))}
    else:
        tok_spec = {"trained": True, "vocab_size": d.vocab_size, "sample_chars": d.tokenizer_sample_chars}
    return {
        "sources": fingerprint(sources, d),
        "text_column": d.text_column,
        "max_chars": d.max_chars,
        "val_fraction": d.val_fraction,
        "val_max_chars": d.val_max_chars,
        "seq_len": d.seq_len,
        "task": cfg.model.task,
        "tokenizer": tok_spec,
    }


def _describe_change(old: dict, new: dict) -> str:
    """One phrase naming the first difference between two specs."""
    for key in new:
        if key == "sources" or old.get(key) == new[key]:
            continue
        if key == "tokenizer":
            o, n = old.get(key) or {}, new[key]
            if o.get("path") != n.get("path") or o.get("trained") != n.get("trained"):
                return f"data.tokenizer {o.get('path')} -> {n.get('path')}"
            if "hash" in n:
                return f"the tokenizer at {n['path']} changed (hash {str(o.get('hash'))[:12]} -> {n['hash'][:12]})"
            for k in n:
                if o.get(k) != n.get(k):
                    return f"data.{'tokenizer_' if k == 'sample_chars' else ''}{k} {o.get(k)} -> {n.get(k)}"
        where = "model.task" if key == "task" else f"data.{key}"
        return f"{where} {old.get(key)} -> {new[key]}"
    so = {(s.get("path") or s.get("name")): s for s in old.get("sources", [])}
    sn = {(s.get("path") or s.get("name")): s for s in new["sources"]}
    added, gone = [k for k in sn if k not in so], [k for k in so if k not in sn]
    if added:
        return f"source {added[0]} is new" + (f" (and {len(added) - 1} more)" if len(added) > 1 else "")
    if gone:
        more = f" (and {len(gone) - 1} more)" if len(gone) > 1 else ""
        return f"source {gone[0]} is no longer in the config or on disk{more}"
    for k, s in sn.items():
        if so[k] != s:
            if s.get("size") != so[k].get("size"):
                return f"source {k} changed (size {so[k].get('size')} -> {s.get('size')} bytes)"
            if s.get("mtime_ns") != so[k].get("mtime_ns"):
                return f"source {k} was modified after preparing"
            return f"source {k} changed ({so[k]} -> {s})"
    if list(so) != list(sn):
        return "the sources are listed in another order"
    return "the preparation settings differ"


def read_manifest(path: str | os.PathLike) -> dict | None:
    """The manifest of a prepared directory, or None when it has none."""
    f = Path(path) / MANIFEST
    if not f.is_file():
        return None
    return json.loads(f.read_text())


def check_manifest(cfg: Any, path: Path, manifest: dict, spec: dict | None = None) -> None:
    """Raise one ProgtrainConfigError line when ``manifest`` was not prepared from what ``cfg`` asks."""
    spec = expected_spec(cfg) if spec is None else spec
    if manifest.get("format") != FORMAT:
        what = f"it has format {manifest.get('format')}, this progtrain reads {FORMAT}"
    elif manifest.get("spec") == spec:
        return
    else:
        what = _describe_change(manifest.get("spec") or {}, spec)
    conf = cfg.source or "CONFIG"
    raise ProgtrainConfigError(
        f"prepared data in {path} does not match the config: {what}; re-prepare with "
        f"`progtrain data prepare {conf} --overwrite` plus this command's --set/--output-dir options, or set "
        f"data.prepared_dir to another directory"
    )


# ---------------------------------------------------------------------- preparing
def _records(data_cfg: Any, sources: list[Source]) -> Iterator[dict]:
    """``{"text", "sep", "val"}`` per document, in order, with the held-out choice made. A piece of a
    text file followed by a held-out piece gets the separator too (its continuation is elsewhere)."""
    val_chars, prev = 0, None
    for k, doc in enumerate(iter_documents(data_cfg, sources)):
        held = is_heldout(k, data_cfg.val_fraction) and val_chars + len(doc.text) <= data_cfg.val_max_chars
        if held:
            val_chars += len(doc.text)
        rec = {"text": doc.text, "sep": True if held else doc.sep, "val": held}
        if prev is not None:
            if held:
                prev["sep"] = True
            yield prev
        prev = rec
    if prev is not None:
        yield prev


def _train_sample(data_cfg: Any, sources: list[Source]) -> Iterator[str]:
    """The training documents the tokenizer learns from: the first ``tokenizer_sample_chars``."""
    n = 0
    for r in _records(data_cfg, sources):
        if r["val"]:
            continue
        yield r["text"]
        n += len(r["text"])
        if n >= data_cfg.tokenizer_sample_chars:
            return


class _ShardWriter:
    """Appends token ids to ``<split>-NNNNN.bin`` files in whole blocks of ``seq_len``."""

    def __init__(self, root: Path, split: str, seq_len: int, dtype: np.dtype) -> None:
        self.root, self.split, self.seq_len, self.dtype = root, split, seq_len, dtype
        self.shard_blocks = max(1, SHARD_BYTES // (seq_len * dtype.itemsize))
        self.rest = np.empty(0, dtype=dtype)
        self.shards: list[dict] = []
        self.fh = None
        self.tokens = 0
        self.docs = 0

    def add(self, ids: np.ndarray, docs: int) -> None:
        self.tokens += len(ids)
        self.docs += docs
        ids = np.concatenate([self.rest, ids.astype(self.dtype, copy=False)]) if len(self.rest) else ids
        n = len(ids) // self.seq_len * self.seq_len
        self.rest = ids[n:].copy()
        blocks = ids[:n].reshape(-1, self.seq_len)
        while len(blocks):
            if self.fh is None or self.shards[-1]["blocks"] == self.shard_blocks:
                self._open()
            take = min(len(blocks), self.shard_blocks - self.shards[-1]["blocks"])
            self.fh.write(np.ascontiguousarray(blocks[:take]).tobytes())
            self.shards[-1]["blocks"] += take
            blocks = blocks[take:]

    def _open(self) -> None:
        if self.fh is not None:
            self.fh.close()
        name = f"{self.split}-{len(self.shards):05d}.bin"
        self.fh = open(self.root / name, "wb")
        self.shards.append({"file": name, "blocks": 0})

    def close(self) -> dict:
        if self.fh is not None:
            self.fh.close()
        return {"shards": self.shards, "blocks": sum(s["blocks"] for s in self.shards), "tokens": self.tokens,
                "docs": self.docs, "dropped_tail_tokens": int(len(self.rest))}


def _auto_num_proc(n_chars: int) -> int:
    """One process per ~16 MB of text, at most the CPUs (and 16)."""
    return max(1, min(os.cpu_count() or 1, 16, n_chars // (16 << 20)))


def prepare(cfg: Any, run_dir: str | os.PathLike | None = None, overwrite: bool = False) -> Path:
    """Tokenise the config's corpus into token shards and a manifest in :func:`prepared_dir`.

    Returns the directory. Raises ProgtrainConfigError for unreadable inputs, a missing text column,
    a corpus that gives no training block, or an existing non-empty directory without ``overwrite``.
    Peak memory: one reader batch plus one tokenizer batch per process, independent of the corpus size."""
    from ..io import atomic_dir

    t0 = time.perf_counter()
    d, dcfg = prepared_dir(cfg, run_dir), cfg.data
    sources = config_sources(dcfg)
    spec = expected_spec(cfg, sources)
    with atomic_dir(d, overwrite=overwrite) as tmp:
        tok = _saved_tokenizer(cfg, sources, tmp / "tokenizer")
        dtype = token_dtype(len(tok))
        sep = separator_id(tok)
        cache = tmp / ".cache"
        docs, tokens, total = _tokenised(dcfg, sources, tok, sep, dtype, spec, cache)
        splits = _write_shards(tokens, total, tmp, dcfg.seq_len, dtype)
        del tokens, docs
        shutil.rmtree(cache, ignore_errors=True)
        if splits["train"]["blocks"] == 0:
            raise ProgtrainConfigError(
                f"the training text gives no block of data.seq_len={dcfg.seq_len} tokens "
                f"({splits['train']['tokens']} tokens): add text or lower data.seq_len"
            )
        manifest = {
            "format": FORMAT, "spec": spec, "seq_len": dcfg.seq_len, "dtype": dtype.name, "vocab_size": len(tok),
            "tokenizer_hash": tokenizer_hash(tok), "separator_id": sep, "splits": splits,
            "prepare_s": round(time.perf_counter() - t0, 2), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    logger.info("prepared %s: %d train / %d val blocks of %d tokens (%s) in %.1f s", d, splits["train"]["blocks"],
                splits["val"]["blocks"], dcfg.seq_len, dtype.name, manifest["prepare_s"])
    return d


def _saved_tokenizer(cfg: Any, sources: list, out: Path) -> Any:
    """The run's tokenizer (``data.tokenizer``, else a byte-level BPE trained on a sample of the
    training documents) saved to ``out`` and loaded back from there: the exact object a run loads."""
    from .data import get_tokenizer, load_tokenizer_from

    dcfg = cfg.data
    if dcfg.tokenizer:
        tok = get_tokenizer(dcfg, cfg.model.task, None)
    else:
        logger.info("training a byte-level BPE tokenizer (%d tokens) on up to %d characters of training documents",
                    dcfg.vocab_size, dcfg.tokenizer_sample_chars)
        tok = get_tokenizer(dcfg, cfg.model.task, _train_sample(dcfg, sources))
    tok.save_pretrained(out)
    return load_tokenizer_from(str(out))


def _tokenised(dcfg: Any, sources: list, tok: Any, sep: int | None, dtype: np.dtype, spec: dict,
               cache: Path) -> tuple[Any, Any, int | None]:
    """The documents as a ``datasets`` dataset (iterable when streaming, else an Arrow cache in
    ``cache``, tokenised in parallel) and their token ids (``sep`` appended where a document asks
    for it) -> ``(docs, tokens, number of documents or None when streaming)``."""
    import datasets

    def encode(batch: dict) -> dict:
        # whole documents, cut into blocks later: the "longer than the model's maximum" warning is noise here
        ids = tok(batch["text"], add_special_tokens=False, verbose=False)["input_ids"]
        return {"ids": [np.asarray(x + [sep] if (s and sep is not None) else x, dtype=dtype)
                        for x, s in zip(ids, batch["sep"])]}

    features = datasets.Features({"text": datasets.Value("string"), "sep": datasets.Value("bool"),
                                  "val": datasets.Value("bool")})
    gen_kwargs = {"data_cfg": dcfg, "sources": tuple(sources)}  # a list would be sharded into pieces
    if dcfg.streaming:
        docs = datasets.IterableDataset.from_generator(_records, features=features, gen_kwargs=gen_kwargs)
        return docs, docs.map(encode, batched=True, batch_size=256, remove_columns=["text"]), None
    fp = hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]
    docs = datasets.Dataset.from_generator(_records, features=features, cache_dir=str(cache), fingerprint=fp,
                                           gen_kwargs=gen_kwargs)
    n_chars = _arrow_chars(docs)
    num_proc = dcfg.num_proc or _auto_num_proc(n_chars)
    logger.info("tokenising %d documents (%d characters) in %d process(es)", len(docs), n_chars, num_proc)
    tokens = docs.map(encode, batched=True, batch_size=256, remove_columns=["text"],
                      num_proc=num_proc if num_proc > 1 else None, new_fingerprint=fp + "-tok",
                      desc="tokenising")
    return docs, tokens, len(docs)


def _write_shards(tokens: Any, total: int | None, out: Path, seq_len: int, dtype: np.dtype) -> dict[str, dict]:
    """Every document's ids appended to the train or val shards (by its ``val`` flag) in ``out``
    -> each split's summary (``_ShardWriter.close``)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    from tqdm.auto import tqdm

    writers = {"train": _ShardWriter(out, "train", seq_len, dtype), "val": _ShardWriter(out, "val", seq_len, dtype)}
    bar = tqdm(total=total, desc="writing token shards", unit="doc", disable=None)
    for tbl in tokens.with_format("arrow").iter(batch_size=1000):
        val = tbl.column("val").to_numpy(zero_copy_only=False)
        for split, mask in (("train", ~val), ("val", val)):
            if mask.any():
                flat = pc.list_flatten(tbl.filter(pa.array(mask)).column("ids"))
                ids = np.concatenate([c.to_numpy(zero_copy_only=False) for c in flat.chunks]) if flat.num_chunks \
                    else np.empty(0, dtype)
                writers[split].add(ids, int(mask.sum()))
        bar.update(tbl.num_rows)
    bar.close()
    return {k: w.close() for k, w in writers.items()}


def _arrow_chars(ds: Any) -> int:
    import pyarrow.compute as pc

    n = 0
    for tbl in ds.select_columns(["text"]).with_format("arrow").iter(batch_size=10_000):
        n += int(pc.sum(pc.utf8_length(tbl.column("text"))).as_py() or 0)
    return n


def ensure_prepared(cfg: Any, run_dir: str | os.PathLike | None = None) -> Path:
    """The prepared directory for ``cfg``: prepared now when it has no manifest, else checked
    against the config (ProgtrainConfigError naming the change when it does not match)."""
    d = prepared_dir(cfg, run_dir)
    manifest = read_manifest(d)
    if manifest is None:
        if d.exists() and any(d.iterdir()):
            raise ProgtrainConfigError(
                f"data.prepared_dir {d} exists without a {MANIFEST}: remove it or point data.prepared_dir elsewhere"
            )
        return prepare(cfg, run_dir, overwrite=d.exists())
    check_manifest(cfg, d, manifest)
    return d


# ---------------------------------------------------------------------- reading
class TokenBlocks:
    """The ``[n_blocks, seq_len]`` blocks of one split, read from the shards by index.

    ``blocks[i]`` is a ``torch.long`` tensor of ``seq_len`` ids copied out of a read-only memmap:
    only the pages of the blocks read are touched, whatever the size of the corpus."""

    def __init__(self, root: str | os.PathLike, split: dict, seq_len: int, dtype: str) -> None:
        self.root, self.seq_len, self.dtype = Path(root), seq_len, np.dtype(dtype)
        self.files = [s["file"] for s in split["shards"]]
        self.starts = np.cumsum([0] + [s["blocks"] for s in split["shards"]]).tolist()
        self._maps: dict[int, np.memmap] = {}

    def __len__(self) -> int:
        return int(self.starts[-1])

    def _map(self, k: int) -> np.memmap:
        if k not in self._maps:
            self._maps[k] = np.memmap(self.root / self.files[k], dtype=self.dtype, mode="r").reshape(-1, self.seq_len)
        return self._maps[k]

    def __getitem__(self, i: int) -> Any:
        import torch

        i = int(i)
        if not 0 <= i < len(self):
            raise IndexError(f"block {i} of {len(self)}")
        k = bisect.bisect_right(self.starts, i) - 1
        return torch.from_numpy(self._map(k)[i - self.starts[k]].astype(np.int64))

    def __getstate__(self) -> dict:  # memmaps are reopened in a DataLoader worker
        return {**self.__dict__, "_maps": {}}
