"""`progtrain grow` / `progtrain verify` on the real MiniLM checkpoint and on bad input."""

import json
import subprocess
import sys

import pytest
import transformers as T

from progtrain.cli import main
from progtrain.io import read_growth_history
from tiny_models import tiny_model


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("heads", [24, 12])
def test_minilm_grows_and_verifies(minilm_path, tmp_path, capsys, heads):
    out = tmp_path / f"minilm_768_{heads}"
    code, text, err = run(capsys, "grow", minilm_path, out, "--hidden-size", 768, "--num-heads", heads,
                          "--intermediate-size", 3072)
    assert code == 0, err
    assert "384" in text and "768" in text and "exact" in text
    cfg = T.AutoConfig.from_pretrained(out)
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.intermediate_size) == (768, heads, 3072)
    assert (out / "tokenizer.json").exists()  # tokenizer carried along
    hist = read_growth_history(out)
    assert hist[-1]["source"]["hidden_size"] == 384 and hist[-1]["target"]["num_heads"] == heads
    from progtrain.card import parse_front_matter

    card = (out / "README.md").read_text()  # model card with the growth table
    assert "progressive-training" in parse_front_matter(card)["tags"]
    assert f"| 1 | growth 1 | 768 | 6 | {heads} |" in card
    code, text, err = run(capsys, "verify", minilm_path, out, "--json")
    assert code == 0, text + err
    assert "sentences tokenised with the source tokenizer" in text
    res = json.loads(text.strip().splitlines()[-1])
    assert res["rel"] <= 1e-5 and res["min_cosine_mean_pooled"] > 0.99999


def test_minilm_depth_growth_reports_deviation(minilm_path, tmp_path, capsys):
    out = tmp_path / "minilm_12l"
    code, text, err = run(capsys, "grow", minilm_path, out, "--num-layers", 12)
    assert code == 0, err
    assert "APPROXIMATE" in text and "post-norm" in text
    rec = read_growth_history(out)[-1]
    assert rec["exact"] is False and rec["deviation"]["rel"] > 1e-5
    assert f"{rec['deviation']['max_abs']:.3e}" in text  # the printed number is the recorded one
    # verify measures a deviation too and fails at the default tolerance
    code, text, _ = run(capsys, "verify", minilm_path, out, "--random")
    assert code == 1 and "FAIL" in text


@pytest.fixture
def tiny_gpt2_dir(tmp_path):
    d = tmp_path / "tiny_gpt2"
    tiny_model("gpt2").save_pretrained(d)
    return d


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--hidden-size", "16"], "smaller than the model's 32"),
        (["--hidden-size", "64", "--num-heads", "5"], "does not divide hidden_size=64"),
        (["--num-heads", "8"], "shrink head_dim"),
        (["--num-kv-heads", "2"], "no grouped-query attention"),
        (["--num-layers", "4", "--layer-placement", "0,9"], "distinct indices"),
        (["--init", "nope", "--hidden-size", "64"], "unknown init strategy 'nope'"),
        ([], "nothing to grow"),
    ],
)
def test_bad_input_exit_2_and_nothing_written(tiny_gpt2_dir, tmp_path, capsys, args, needle):
    out = tmp_path / "out"
    code, text, err = run(capsys, "grow", tiny_gpt2_dir, out, *args)
    assert code == 2
    last = err.strip().splitlines()[-1]
    assert last.startswith("progtrain grow: error:") and needle in last, err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_kv_heads_not_dividing_heads(tmp_path, capsys):
    src = tmp_path / "llama"
    tiny_model("llama", kv=2).save_pretrained(src)
    code, _, err = run(capsys, "grow", src, tmp_path / "o", "--num-heads", "8", "--num-kv-heads", "3")
    assert code == 2 and "num_kv_heads=3 does not divide num_heads=8" in err
    assert not (tmp_path / "o").exists()


def test_unsupported_architecture(tmp_path, capsys):
    src = tmp_path / "distilbert"
    T.DistilBertModel(T.DistilBertConfig(dim=32, n_heads=4, hidden_dim=64, n_layers=1, vocab_size=50)).save_pretrained(src)
    code, _, err = run(capsys, "grow", src, tmp_path / "o", "--hidden-size", "64")
    assert code == 2 and "model_type 'distilbert' is not supported" in err and "gpt2" in err
    assert not (tmp_path / "o").exists()


def test_unknown_head_is_refused(tmp_path, capsys):
    src = tmp_path / "cls"
    T.BertForSequenceClassification(T.BertConfig(hidden_size=32, num_attention_heads=4, intermediate_size=64,
                                                 num_hidden_layers=1, vocab_size=50)).save_pretrained(src)
    code, _, err = run(capsys, "grow", src, tmp_path / "o", "--hidden-size", "64")
    assert code == 2 and "classifier" in err
    assert not (tmp_path / "o").exists()


def test_pickle_only_checkpoint_refused(tmp_path, tiny_gpt2_dir, capsys):
    src = tmp_path / "pickle"
    tiny_model("gpt2").save_pretrained(src, safe_serialization=False)
    for f in src.glob("*.safetensors"):
        f.unlink()
    if not (src / "pytorch_model.bin").exists():
        import torch

        torch.save(tiny_model("gpt2").state_dict(), src / "pytorch_model.bin")
    code, _, err = run(capsys, "grow", src, tmp_path / "o", "--hidden-size", "64")
    assert code == 2 and "safetensors" in err and "save_pretrained" in err


def test_existing_output_needs_overwrite(tiny_gpt2_dir, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    code, _, err = run(capsys, "grow", tiny_gpt2_dir, out, "--hidden-size", "64")
    assert code == 2 and "--overwrite" in err and (out / "keep.txt").exists()
    code, _, err = run(capsys, "grow", tiny_gpt2_dir, out, "--hidden-size", "64", "--overwrite")
    assert code == 0 and not (out / "keep.txt").exists()


def test_console_script_help_and_usage_error():
    proc = subprocess.run([sys.executable, "-m", "progtrain.cli", "grow", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "--hidden-size" in proc.stdout and "--layer-placement" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "progtrain.cli", "grow"], capture_output=True, text=True)
    assert proc.returncode == 2


# ---------------------------------------------------------------------- verify: any growth of SRC, or one clear line
@pytest.mark.parametrize("family", ["llama", "bert"])
def test_verify_follows_a_chain_of_growths_of_a_headless_model(tmp_path, capsys, family):
    """SRC -> wider -> deeper with two `progtrain grow` calls: verify composes the hidden maps of the
    whole history (it used to read only the last record and crash)."""
    src = tmp_path / "src"
    tiny_model(family, head=False).save_pretrained(src)
    wide, deep = tmp_path / "wide", tmp_path / "deep"
    assert run(capsys, "grow", src, wide, "--hidden-size", 48, "--intermediate-size", 96)[0] == 0
    assert run(capsys, "grow", wide, deep, "--num-layers", 4)[0] == 0
    code, text, err = run(capsys, "verify", src, deep, "--random")
    exact = family == "llama"  # BERT's post-norm depth growth is approximate (1), never a crash
    assert code == (0 if exact else 1), err
    assert ("PASS" if exact else "FAIL") in text and "compared hidden" in text
    code, text, err = run(capsys, "verify", deep, src, "--random")  # reversed: not a growth of it
    assert code == 2 and text == "" and len(err.strip().splitlines()) == 1 and "OUT must be a growth of SRC" in err


def test_verify_headless_source_against_a_model_with_a_head(tmp_path, capsys):
    """A BertModel checkpoint against a BertForMaskedLM grown from it: the base models' hidden states."""
    src, out = tmp_path / "src", tmp_path / "out"
    base = tiny_model("bert", head=False)
    base.save_pretrained(src)
    mlm = T.BertForMaskedLM(base.config)
    mlm.bert.load_state_dict(base.state_dict(), strict=False)
    mlm.save_pretrained(out)
    capsys.readouterr()
    code, text, err = run(capsys, "verify", src, out, "--random")
    assert code == 0 and "compared hidden" in text and "PASS" in text, err


def test_verify_unrelated_models_is_one_line(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    tiny_model("gpt2").save_pretrained(a)
    m = tiny_model("gpt2")
    m.resize_token_embeddings(8)
    m.save_pretrained(b)
    capsys.readouterr()  # save_pretrained's progress bars
    code, text, err = run(capsys, "verify", a, b, "--random")
    assert code == 2 and text == "" and len(err.strip().splitlines()) == 1 and "smaller vocabulary" in err
