"""Prepared data (progtrain.train.shards / sources): every input kind tokenises to exactly the
documents it holds, the held-out split is by documents and unseen by the tokenizer, a prepared
directory is reused and refused when the config no longer matches it, training on it resumes bit
for bit, and two processes read disjoint samples whose union is what one process reads."""

import json

import numpy as np
import pytest
import torch

from progtrain.cli import main
from progtrain.errors import ProgtrainConfigError
from progtrain.train import shards
from progtrain.train.config import from_dict
from progtrain.train.data import prepare_data, train_tokenizer
from progtrain.train.sources import is_heldout, iter_documents, resolve_sources

WORDS = ("the king and queen of france went to war over a crown of gold while the fool sang "
         "songs of love and death in the castle by the sea").split()


def make_docs(n=60, seed=0):
    """``n`` documents of 20-80 words (distinct, deterministic)."""
    rng = np.random.default_rng(seed)
    return [f"doc {i}: " + " ".join(rng.choice(WORDS, size=int(rng.integers(20, 80)))) + "." for i in range(n)]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tok"
    train_tokenizer(make_docs(200, seed=1), 300, "causal_lm").save_pretrained(path)
    return str(path)


def cfg_for(tmp_path, tok=None, top=None, **data):
    d = {"output_dir": str(tmp_path / "run"), "seed": 1,
         "model": {"family": "gpt2", "config": {"n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 64}},
         "data": {"seq_len": 16, "vocab_size": 300, "val_fraction": 0.1, **({"tokenizer": tok} if tok else {}), **data},
         "optim": {"lr": 3e-3, "warmup_steps": 2},
         "train": {"max_steps": 8, "batch_size": 4, "eval_interval": 4, "eval_batches": 2, "log_interval": 1}}
    for k, v in (top or {}).items():
        d[k] = {**d[k], **v} if isinstance(v, dict) and isinstance(d.get(k), dict) else v
    return from_dict(d)


def shard_tokens(d, split):
    m = shards.read_manifest(d)
    parts = [np.fromfile(d / s["file"], dtype=m["dtype"]) for s in m["splits"][split]["shards"]]
    return np.concatenate(parts) if parts else np.empty(0, dtype=m["dtype"])


def expected_tokens(tok, docs, seq_len):
    ids = []
    for doc in docs:
        ids += tok(doc, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    return np.array(ids[: len(ids) // seq_len * seq_len])


# ---------------------------------------------------------------------- input kinds
def write_kind(kind, root, docs, field="body"):
    """``docs`` written as input ``kind`` under ``root``; returns the data config entries."""
    import datasets

    root.mkdir(parents=True, exist_ok=True)
    if kind in ("directory", "glob"):
        (root / "a" / "b").mkdir(parents=True)
        half = len(docs) // 2
        (root / "a" / "1.txt").write_text("\n\n".join(docs[:half]))  # path order: a/1.txt, then a/b/2.txt
        (root / "a" / "b" / "2.txt").write_text("\n\n".join(docs[half:]))
        (root / "a" / ".hidden.txt").write_text("never read")
        (root / "a" / "notes.bin").write_bytes(b"\x00\xff never read")
        return {"files": [str(root / "a")] if kind == "directory" else [str(root / "a" / "**" / "*.txt")]}
    table = datasets.Dataset.from_dict({field: docs, "id": list(range(len(docs)))})
    if kind == "jsonl":
        table.to_json(root / "c.jsonl")
        return {"files": [str(root / "c.jsonl")], "text_column": field}
    if kind == "json_list":
        (root / "c.json").write_text(json.dumps([{field: t} for t in docs]))
        return {"files": [str(root / "c.json")], "text_column": field}
    if kind == "parquet":
        table.to_parquet(root / "c.parquet")
        return {"files": [str(root / "c.parquet")], "text_column": field}
    if kind == "csv":
        table.to_csv(root / "c.csv", index=False)
        return {"files": [str(root / "c.csv")], "text_column": field}
    if kind == "saved":
        datasets.DatasetDict({"train": table}).save_to_disk(str(root / "saved"))
        return {"dataset": str(root / "saved"), "text_column": field}
    if kind == "dataset_jsonl":  # a local .jsonl as data.dataset (a false "Couldn't find any data file" before)
        table.to_json(root / "c.jsonl")
        return {"dataset": str(root / "c.jsonl"), "text_column": field}
    if kind == "streaming_jsonl":
        for i, part in enumerate((docs[: len(docs) // 2], docs[len(docs) // 2:])):
            datasets.Dataset.from_dict({field: part}).to_json(root / f"s{i}.jsonl")
        return {"files": [str(root / "s*.jsonl")], "text_column": field, "streaming": True}
    raise ValueError(kind)


KINDS = ["directory", "glob", "jsonl", "json_list", "parquet", "csv", "saved", "dataset_jsonl", "streaming_jsonl"]


@pytest.mark.parametrize("kind", KINDS)
def test_input_kind_tokenises_exactly_its_documents(kind, tmp_path, tok_dir):
    from transformers import AutoTokenizer

    docs = make_docs()
    cfg = cfg_for(tmp_path, tok_dir, **write_kind(kind, tmp_path / "in", docs))
    read = list(iter_documents(cfg.data))
    if kind in ("directory", "glob"):
        # text files: paragraph-aligned pieces that concatenate back to each file, the separator after the last
        assert "".join(d.text for d in read) == "\n\n".join(docs[:30]) + "\n\n".join(docs[30:])
        assert sum(d.sep for d in read) == 2 and read[-1].sep
    else:
        assert [d.text for d in read] == docs and all(d.sep for d in read)
    d = shards.ensure_prepared(cfg)
    m = shards.read_manifest(d)
    assert m["dtype"] == "uint16" and m["seq_len"] == 16
    tok = AutoTokenizer.from_pretrained(d / "tokenizer")
    recs = list(shards._records(cfg.data, resolve_sources(cfg.data.files or [cfg.data.dataset])))
    val_docs = [r["text"] for r in recs if r["val"]]
    assert len(val_docs) >= 1 and m["splits"]["val"]["docs"] == len(val_docs)
    if kind not in ("directory", "glob"):
        train_docs = [t for t in docs if t not in val_docs]
        assert np.array_equal(shard_tokens(d, "train"), expected_tokens(tok, train_docs, 16))
        assert np.array_equal(shard_tokens(d, "val"), expected_tokens(tok, val_docs, 16))
    data = prepare_data(cfg)
    assert torch.equal(data.train_blocks[1], torch.from_numpy(shard_tokens(d, "train")[16:32].astype(np.int64)))


def test_streaming_and_parallel_paths_write_identical_shards(tmp_path, tok_dir):
    ins = write_kind("jsonl", tmp_path / "in", make_docs(120))
    a = shards.prepare(cfg_for(tmp_path, tok_dir, prepared_dir=str(tmp_path / "a"), **ins))
    b = shards.prepare(cfg_for(tmp_path, tok_dir, prepared_dir=str(tmp_path / "b"), num_proc=2, **ins))
    c = shards.prepare(cfg_for(tmp_path, tok_dir, prepared_dir=str(tmp_path / "c"), streaming=True, **ins))
    for split in ("train", "val"):
        assert np.array_equal(shard_tokens(a, split), shard_tokens(b, split))
        assert np.array_equal(shard_tokens(a, split), shard_tokens(c, split))
    assert not (a / ".cache").exists()


def test_text_pieces_follow_paragraphs(tmp_path):
    from progtrain.train import sources

    text = "".join(f"para {i} " + "x" * 300 + "\n\n" for i in range(20)) + "last line"
    (tmp_path / "t.txt").write_text(text)
    pieces = list(sources._text_docs(str(tmp_path / "t.txt")))
    assert "".join(p.text for p in pieces) == text and len(pieces) > 3
    assert all(p.text.endswith("\n\n") for p in pieces[:-1]) and [p.sep for p in pieces] == [False] * (len(pieces) - 1) + [True]
    assert all(len(p.text) < sources.TEXT_DOC_CHARS + 400 for p in pieces)


def test_missing_inputs_are_one_line_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    for entry, msg in [(str(tmp_path / "nope.txt"), "does not exist"), (str(tmp_path / "*.jsonl"), "matches no file"),
                       (str(tmp_path / "empty"), "holds no .txt")]:
        with pytest.raises(ProgtrainConfigError, match=msg):
            cfg_for(tmp_path, files=[entry])
    (tmp_path / "c.jsonl").write_text(json.dumps({"body": "hello"}) + "\n")
    cfg = cfg_for(tmp_path, files=[str(tmp_path / "c.jsonl")])
    with pytest.raises(ProgtrainConfigError, match=r"text_column='text' is not a column of .*c.jsonl \(columns: \['body'\]\)"):
        list(iter_documents(cfg.data))


# ---------------------------------------------------------------------- held-out split
def test_heldout_split_by_documents_bounded_and_unseen_by_tokenizer(tmp_path, monkeypatch):
    assert [k for k in range(45) if is_heldout(k, 0.1)] == [0, 10, 20, 30, 40]
    docs = make_docs(100)
    ins = write_kind("jsonl", tmp_path / "in", docs)
    seen = []
    from progtrain.train import data as data_mod

    orig = data_mod.train_tokenizer
    monkeypatch.setattr(data_mod, "train_tokenizer", lambda texts, v, t: orig(seen.extend(texts) or seen, v, t))
    cap = sum(len(docs[k]) for k in (0, 10, 20))  # room for three held-out documents
    cfg = cfg_for(tmp_path, val_max_chars=cap, **ins)
    d = shards.prepare(cfg)
    val = [r["text"] for r in shards._records(cfg.data, resolve_sources(cfg.data.files)) if r["val"]]
    assert val == [docs[0], docs[10], docs[20]]  # by documents, even over the corpus, bounded
    assert seen and not set(seen) & set(val) and set(seen) <= set(docs)
    assert shards.read_manifest(d)["splits"]["val"]["docs"] == 3


# ---------------------------------------------------------------------- reuse and refusal
def test_prepared_data_is_reused_not_retokenised(tmp_path, tok_dir, monkeypatch):
    cfg = cfg_for(tmp_path, tok_dir, **write_kind("parquet", tmp_path / "in", make_docs()))
    first = prepare_data(cfg)
    d = shards.prepared_dir(cfg)
    stamp = {f.name: f.stat().st_mtime_ns for f in d.iterdir()}

    def boom(*a, **k):
        raise AssertionError("prepared again")

    monkeypatch.setattr(shards, "prepare", boom)
    again = prepare_data(cfg)
    assert len(again.train_blocks) == len(first.train_blocks)
    assert torch.equal(again.train_blocks[len(first.train_blocks) - 1], first.train_blocks[len(first.train_blocks) - 1])
    assert {f.name: f.stat().st_mtime_ns for f in d.iterdir()} == stamp


def _yaml(tmp_path, data):
    import yaml

    p = tmp_path / "run.yaml"
    p.write_text(yaml.safe_dump({
        "output_dir": str(tmp_path / "run"), "model": {"family": "gpt2", "config": {"n_embd": 32, "n_layer": 1,
                                                                                   "n_head": 4, "n_positions": 64}},
        "data": {"seq_len": 16, "vocab_size": 300, "val_fraction": 0.1, **data},
        "train": {"max_steps": 2, "batch_size": 4, "eval_interval": 0}}))
    return str(p)


@pytest.mark.parametrize("change", ["source_file", "seq_len", "text_column", "new_file"])
def test_manifest_mismatch_refused_with_one_line(tmp_path, capsys, change):
    ins = write_kind("jsonl", tmp_path / "in", make_docs())
    conf = _yaml(tmp_path, ins)
    assert main(["data", "prepare", conf]) == 0
    capsys.readouterr()
    args = ["train", conf]
    if change == "source_file":
        with open(ins["files"][0], "a") as fh:
            fh.write(json.dumps({"body": "one more document"}) + "\n")
        what = "c.jsonl changed (size"
    elif change == "seq_len":
        args += ["--set", "data.seq_len=8"]
        what = "data.seq_len 16 -> 8"
    elif change == "text_column":
        args += ["--set", "data.text_column=id"]
        what = "data.text_column body -> id"
    else:
        (tmp_path / "in" / "d.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
        args += ["--set", f"data.files=[{ins['files'][0]},{tmp_path / 'in' / 'd.jsonl'}]"]
        what = "d.jsonl is new"
    before = sorted(p.name for p in (tmp_path / "run").iterdir())
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and what in err and "progtrain data prepare" in err and "--overwrite" in err
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == before  # nothing written
    if change == "seq_len":
        assert main(["data", "prepare", conf, "--set", "data.seq_len=8", "--overwrite"]) == 0
        assert shards.read_manifest(tmp_path / "run" / "data")["seq_len"] == 8


@pytest.mark.parametrize("command", ["data", "train"])
def test_bad_text_column_leaves_no_directory_behind(tmp_path, capsys, command):
    ins = write_kind("jsonl", tmp_path / "in", make_docs())
    conf = _yaml(tmp_path, {**ins, "text_column": "nope"})
    capsys.readouterr()  # writing the inputs printed progress
    args = ["data", "prepare", conf] if command == "data" else ["train", conf]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "text_column='nope' is not a column" in err
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------- training on prepared data
def test_resume_bit_identical_on_prepared_data(tmp_path, tok_dir):
    from progtrain.train.engine import train
    from progtrain.train.report import read_metrics

    ins = write_kind("jsonl", tmp_path / "in", make_docs(200))
    common = dict(prepared_dir=str(tmp_path / "prepared"), **ins)
    stages = [{"name": "wide", "start_step": 4, "grow": {"hidden_size": 64, "num_heads": 8}}]

    def cfg(out):
        return cfg_for(tmp_path, tok_dir, top={"output_dir": str(out), "stages": stages,
                                               "train": {"checkpoint_interval": 3}}, **common)

    def losses(out):
        return [(m["step"], m["train_loss"]) for m in read_metrics(f"{out}/metrics.jsonl") if m["event"] == "train"]

    train(cfg(tmp_path / "a"))
    assert train(cfg(tmp_path / "b"), stop_at_step=6)["stopped_at"] == 6
    train(cfg(tmp_path / "b"), resume=True)
    assert losses(tmp_path / "b") == losses(tmp_path / "a") and len(losses(tmp_path / "a")) == 8
    assert not (tmp_path / "a" / "data").exists()  # both runs read the one prepared directory


class Recorder(torch.utils.data.Dataset):
    def __init__(self, stream):
        self.stream, self.read = stream, []

    def __len__(self):
        return len(self.stream)

    def __getitem__(self, i):
        self.read.append(i)
        return self.stream[i]


def test_two_ranks_read_disjoint_samples_whose_union_is_one_process(tmp_path, tok_dir):
    """The engine's loader (global micro-batches split over processes by accelerate, split_batches)
    on prepared data: each rank reads only its own samples."""
    from accelerate.data_loader import prepare_data_loader

    cfg = cfg_for(tmp_path, tok_dir, **write_kind("jsonl", tmp_path / "in", make_docs(120)))
    data = prepare_data(cfg)
    n, micro_global = 40, 8

    def loader(rank=None):
        rec = Recorder(data.train_stream(16, n))
        dl = torch.utils.data.DataLoader(rec, batch_size=micro_global, shuffle=False)
        if rank is not None:
            dl = prepare_data_loader(dl, num_processes=2, process_index=rank, split_batches=True, put_on_device=False)
        return rec, [b["input_ids"] for b in dl]

    one, one_batches = loader()
    ranks = [loader(r) for r in (0, 1)]
    r0, r1 = set(ranks[0][0].read), set(ranks[1][0].read)
    assert not r0 & r1 and sorted(r0 | r1) == sorted(one.read) == list(range(n))
    assert len(ranks[0][0].read) == len(ranks[1][0].read) == n // 2
    for k, batch in enumerate(one_batches):  # rank 0 + rank 1 halves = the one-process global batch
        assert torch.equal(torch.cat([ranks[0][1][k], ranks[1][1][k]]), batch)


def test_token_dtype_is_smallest_that_holds_the_vocabulary():
    assert shards.token_dtype(256) == np.uint8 and shards.token_dtype(257) == np.uint16
    assert shards.token_dtype(65536) == np.uint16 and shards.token_dtype(50257) == np.uint16
    assert shards.token_dtype(65537) == np.uint32 and shards.token_dtype(151_936) == np.uint32

