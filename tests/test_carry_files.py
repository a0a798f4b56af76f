"""A grown checkpoint keeps every file of its source that the growth does not invalidate: generation
settings (through grow(), save_checkpoint, the CLI and a training run), tokenizer files,
sentence-transformers modules (embedding width updated), custom code, unknown small files; the CLI
lists the files it did not carry, with the reason."""

import json
from pathlib import Path

import pytest
import torch
import transformers as T
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import GenerationConfig, PreTrainedTokenizerFast

from progtrain import grow
from progtrain.card import parse_front_matter
from progtrain.carry import UNKNOWN_MAX_BYTES, plan_carry
from progtrain.cli import main
from progtrain.hub import files_to_push
from progtrain.io import load_model, save_checkpoint
from tiny_models import tiny_model

PROMPT = torch.tensor([[3, 14, 15, 9, 26]])
MAX_NEW = 7
TOKENIZER_GLOBS = ("tokenizer*.json", "special_tokens_map.json", "added_tokens.json", "chat_template.*", "vocab*",
                   "merges.txt")


def greedy(model, generation_config=None, **kw):
    with torch.no_grad():
        return model.generate(PROMPT, attention_mask=torch.ones_like(PROMPT), do_sample=False,
                              generation_config=generation_config, **kw)


def generation_settings(model) -> GenerationConfig:
    """Several eos ids (one of them the token greedy decoding emits third, so the eos ids decide where
    generation stops), sampling defaults and max_new_tokens."""
    free = greedy(model, max_new_tokens=MAX_NEW, eos_token_id=None, pad_token_id=0)[0, PROMPT.shape[1]:].tolist()
    assert len(free) == MAX_NEW
    return GenerationConfig(eos_token_id=[free[2], 100], bos_token_id=1, pad_token_id=0, do_sample=True,
                            temperature=0.7, top_p=0.9, top_k=20, max_new_tokens=MAX_NEW, repetition_penalty=1.0)


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=90, special_tokens=["<unk>", "<eos>", "<pad>"], show_progress=False)
    tok.train_from_iterator(["Progressive training grows a small model into a large one."] * 4, trainer)
    t = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>", pad_token="<pad>")
    t.add_tokens(["<tool>"])
    t.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}<eos>{% endfor %}"
    return t


def files(d: Path) -> dict[str, bytes]:
    return {f.relative_to(d).as_posix(): f.read_bytes() for f in sorted(d.rglob("*")) if f.is_file()}


@pytest.fixture
def gen_source(tmp_path):
    """A tiny GPT-2 LM directory with a generation_config.json, a tokenizer (added token, chat
    template), custom code named in auto_map, a licensed card, an unknown file and files the growth
    invalidates (a pickle copy of the weights, optimizer state, an ONNX export, a download cache)."""
    model = tiny_model("gpt2", tie=False)
    model.generation_config = generation_settings(model)
    model.config.auto_map = {"AutoModelForCausalLM": "modeling_custom.CustomGPT2LMHeadModel"}
    d = tmp_path / "src"
    model.save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    if not (d / "special_tokens_map.json").exists():
        (d / "special_tokens_map.json").write_text('{"eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>"}')
    (d / "modeling_custom.py").write_text("from transformers import GPT2LMHeadModel\n\n\n"
                                          "class CustomGPT2LMHeadModel(GPT2LMHeadModel):\n    pass\n")
    (d / "README.md").write_text("---\nlicense: mit\nlanguage: en\n---\n# the source model\n")
    (d / "notes").mkdir()
    (d / "notes" / "data_card.txt").write_text("trained on nothing in particular\n")
    torch.save({k: v.clone() for k, v in model.state_dict().items()}, d / "pytorch_model.bin")
    torch.save({"state": {}}, d / "optimizer.pt")
    (d / "onnx").mkdir()
    (d / "onnx" / "model.onnx").write_bytes(b"onnx for the source sizes")
    (d / ".cache" / "huggingface").mkdir(parents=True)
    (d / ".cache" / "huggingface" / "model.safetensors.metadata").write_text("etag\n")
    return d, model


# ---------------------------------------------------------------------- generation settings
def test_grow_carries_generation_config(gen_source, tmp_path):
    src, model = gen_source
    loaded = load_model(str(src))
    assert loaded.generation_config == model.generation_config  # the source round-trips
    res = grow(loaded, hidden_size=64, num_heads=8, num_layers=3)
    assert res.exact and res.deviation["rel"] <= 1e-5
    assert res.model.generation_config == model.generation_config
    assert res.model.generation_config is not loaded.generation_config  # a copy, not shared
    out = save_checkpoint(res.model, tmp_path / "out", history=[res.record])
    assert GenerationConfig.from_pretrained(out) == model.generation_config
    # same settings -> same max_new_tokens and eos: the function-preserving growth generates the same tokens
    reloaded = T.AutoModelForCausalLM.from_pretrained(out)
    a, b = greedy(model), greedy(reloaded)
    assert torch.equal(a, b)
    assert PROMPT.shape[1] < a.shape[1] < PROMPT.shape[1] + MAX_NEW  # stopped at an eos id, not at the length
    assert a[0, -1].item() in model.generation_config.eos_token_id
    # the test can fail: the config-derived settings the grown model had before this fix differ
    derived = GenerationConfig.from_model_config(reloaded.config)
    assert derived != model.generation_config and greedy(reloaded, derived).shape != a.shape


def test_rebuilt_models_keep_generation_config():
    """Every place that rebuilds a model from its config (baking a parametrised model, gathering a
    DeepSpeed model for saving) keeps the generation settings."""
    from torch.nn.utils import parametrize

    from progtrain.bake import baked_copy
    from progtrain.train.distributed import _rebuilt_model

    model = tiny_model("gpt2")
    model.generation_config = generation_settings(model)

    class Scale(torch.nn.Module):
        def forward(self, x):
            return x * 1.0

    rebuilt = _rebuilt_model(model, {k: v.detach().clone() for k, v in model.named_parameters()})
    assert rebuilt.generation_config == model.generation_config
    parametrize.register_parametrization(model.transformer.h[0].mlp.c_fc, "weight", Scale())
    plain = baked_copy(model)
    assert plain is not model and plain.generation_config == model.generation_config


def test_cli_grow_carries_files_and_lists_the_rest(gen_source, tmp_path, capsys):
    src, model = gen_source
    out = tmp_path / "out"
    code = main(["grow", str(src), str(out), "--hidden-size", "64", "--num-heads", "8"])
    cap = capsys.readouterr()
    assert code == 0, cap.err
    # generation settings
    assert GenerationConfig.from_pretrained(out) == model.generation_config
    grown = T.AutoModelForCausalLM.from_pretrained(out)
    assert grown.generation_config == model.generation_config
    assert torch.equal(greedy(grown), greedy(model))
    # tokenizer files byte-identical, and the tokenizer behaves the same
    s, o = files(src), files(out)
    tok_files = sorted(n for n in s if any(Path(n).match(g) for g in TOKENIZER_GLOBS))
    assert {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"} <= set(tok_files)
    assert all(o.get(n) == s[n] for n in tok_files), [n for n in tok_files if o.get(n) != s[n]]
    t_src, t_out = T.AutoTokenizer.from_pretrained(src), T.AutoTokenizer.from_pretrained(out)
    text = "Progressive <tool> training"
    assert t_out(text)["input_ids"] == t_src(text)["input_ids"] and "<tool>" in t_out.get_vocab()
    msgs = [{"role": "user", "content": "grow"}]
    assert t_out.apply_chat_template(msgs, tokenize=False) == t_src.apply_chat_template(msgs, tokenize=False)
    assert t_out.special_tokens_map == t_src.special_tokens_map
    # custom code and unknown files carried verbatim; auto_map kept in the rebuilt config
    assert o["modeling_custom.py"] == s["modeling_custom.py"] and o["notes/data_card.txt"] == s["notes/data_card.txt"]
    assert json.loads(o["config.json"])["auto_map"] == model.config.auto_map
    # invalidated files not carried
    for gone in ("pytorch_model.bin", "optimizer.pt", "onnx/model.onnx", ".cache/huggingface/model.safetensors.metadata"):
        assert gone not in o
    # the new card keeps the source's license
    assert parse_front_matter(o["README.md"].decode())["license"] == "mit"
    # the CLI lists what it did not carry, with the reason
    text = cap.out
    listed = text.split("files of the source not carried:\n", 1)[1]
    for name, why in [("pytorch_model.bin", "replaced: weights of the source model"),
                      ("model.safetensors", "replaced: weights of the source model"),
                      ("config.json", "replaced: rebuilt for the grown sizes"),
                      ("README.md", "replaced: describes the source model"),
                      ("optimizer.pt", "dropped: training state"),
                      ("onnx/model.onnx", "dropped: weights exported for the source sizes"),
                      (".cache/huggingface/model.safetensors.metadata", "dropped: hidden file")]:
        line = next((l for l in listed.splitlines() if l.strip().startswith(name + " ")), None)
        assert line is not None and why in line, (name, text)
    assert "carried as is (not known checkpoint files): notes/data_card.txt" in text
    for kept in ("generation_config.json", "tokenizer.json", "modeling_custom.py"):
        assert f"  {kept} " not in listed
    # and `progtrain push` uploads what was carried (custom code named in auto_map included)
    pushed = files_to_push(out)
    assert {"modeling_custom.py", "notes/data_card.txt", "generation_config.json", *tok_files} <= set(pushed)


# ---------------------------------------------------------------------- sentence-transformers
def test_minilm_sentence_transformers_files(minilm_path, tmp_path):
    """The real all-MiniLM-L6-v2 directory grown wider: pipeline files carried, the pooling module's
    word_embedding_dimension equals the new hidden size, tokenizer files byte-identical, and the
    sentence-transformers pipeline (mean pooling + normalize) gives the same similarities."""
    src = Path(minilm_path)
    model = load_model(str(src))
    res = grow(model, hidden_size=768, num_heads=12)
    out = save_checkpoint(res.model, tmp_path / "wide", carry_from=src)
    s, o = files(src), files(out)
    for name in ("modules.json", "config_sentence_transformers.json", "sentence_bert_config.json", "tokenizer.json",
                 "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "data_config.json"):
        assert o[name] == s[name], name
    pool_src, pool_out = json.loads(s["1_Pooling/config.json"]), json.loads(o["1_Pooling/config.json"])
    assert pool_src["word_embedding_dimension"] == 384
    assert pool_out == dict(pool_src, word_embedding_dimension=768)
    assert T.AutoConfig.from_pretrained(out).hidden_size == 768
    assert "README.md" not in o  # the source's card describes the 384-wide model
    assert {"modules.json", "1_Pooling/config.json", "sentence_bert_config.json"} <= set(files_to_push(out))

    def embed(m, d):
        tok = T.AutoTokenizer.from_pretrained(d)
        enc = tok(["a small model grows", "the fox jumps", "summer's day"], padding=True, return_tensors="pt")
        with torch.no_grad():
            h = m(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).float()
        e = (h * mask).sum(1) / mask.sum(1)  # pooling_mode_mean_tokens
        return torch.nn.functional.normalize(e, dim=-1)

    grown = load_model(str(out))
    e_src, e_out = embed(model, src), embed(grown, out)
    assert e_out.shape[-1] == pool_out["word_embedding_dimension"]
    assert (e_out @ e_out.T - e_src @ e_src.T).abs().max() <= 1e-5


def st_dir(tmp_path: Path, model) -> Path:
    """A sentence-transformers directory around a tiny BERT: Transformer, Pooling, Dense(32->16), Normalize."""
    d = tmp_path / "st"
    model.save_pretrained(d)
    h = model.config.hidden_size
    mods = [("", "Transformer"), ("1_Pooling", "Pooling"), ("2_Dense", "Dense"), ("3_Normalize", "Normalize")]
    (d / "modules.json").write_text(json.dumps(
        [{"idx": i, "name": str(i), "path": p, "type": f"sentence_transformers.models.{t}"} for i, (p, t) in
         enumerate(mods)], indent=2))
    (d / "1_Pooling").mkdir()
    (d / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": h,
                                                             "pooling_mode_mean_tokens": True}))
    (d / "2_Dense").mkdir()
    (d / "2_Dense" / "config.json").write_text(json.dumps({"in_features": h, "out_features": 16, "bias": True}))
    save_file({"linear.weight": torch.randn(16, h), "linear.bias": torch.randn(16)}, d / "2_Dense" / "model.safetensors")
    (d / "3_Normalize").mkdir()
    return d


def test_sentence_transformers_dense_dropped_when_width_grows(tmp_path):
    model = tiny_model("bert", head=False)
    src = st_dir(tmp_path, model)
    res = grow(model, hidden_size=64, num_heads=8, verify=False)
    out = save_checkpoint(res.model, tmp_path / "wide", carry_from=src)
    modules = json.loads((out / "modules.json").read_text())
    assert [m["path"] for m in modules] == ["", "1_Pooling", "3_Normalize"]
    assert not (out / "2_Dense").exists() and (out / "3_Normalize").is_dir()
    assert json.loads((out / "1_Pooling" / "config.json").read_text())["word_embedding_dimension"] == 64
    plan = {d.path: d for d in plan_carry(src, model.config, res.model.config)}
    assert plan["2_Dense/model.safetensors"].action == "drop" and "width 32" in plan["2_Dense/config.json"].reason
    assert plan["modules.json"].action == "update" and "2_Dense" in plan["modules.json"].reason


def test_sentence_transformers_all_carried_when_width_kept(tmp_path):
    model = tiny_model("bert", head=False)
    src = st_dir(tmp_path, model)
    res = grow(model, num_layers=3, verify=False)
    out = save_checkpoint(res.model, tmp_path / "deep", carry_from=src)
    s, o = files(src), files(out)
    for name in ("modules.json", "1_Pooling/config.json", "2_Dense/config.json", "2_Dense/model.safetensors"):
        assert o[name] == s[name], name
    assert (out / "3_Normalize").is_dir()


# ---------------------------------------------------------------------- the rule table
def test_plan_decides_every_file_by_rule(tmp_path):
    src = tmp_path / "src"
    cfg = tiny_model("gpt2").config
    cfg.save_pretrained(src)
    names = {
        "model-00001-of-00002.safetensors": "weights", "model.safetensors.index.json": "weights",
        "pytorch_model.bin": "weights", "tf_model.h5": "weights", "generation_config.json": "generation",
        "progtrain_growth.json": "growth-history", "README.md": "model-card", "tokenizer.json": "tokenizer",
        "merges.txt": "tokenizer", "vocab.json": "tokenizer", "chat_template.jinja": "tokenizer",
        "spiece.model": "tokenizer", "added_tokens.json": "tokenizer", "modeling_x.py": "custom-code",
        "trainer_state.json": "training-state", "rng_state_0.pth": "training-state",
        "checkpoint-10/model.safetensors": "training-state", "metrics.jsonl": "metrics",
        "onnx/model.onnx": "exported-weights", "model.gguf": "exported-weights", ".gitattributes": "vcs",
        ".cache/huggingface/x.lock": "hidden", "my_notes.md": "unknown", "big.dat": "unknown",
    }
    for n in names:
        (src / n).parent.mkdir(parents=True, exist_ok=True)
        (src / n).write_bytes(b"x")
    with open(src / "big.dat", "r+b") as f:  # sparse: no disk used
        f.truncate(UNKNOWN_MAX_BYTES + 1)
    plan = {d.path: d for d in plan_carry(src, cfg, cfg)}
    assert set(plan) == set(names) | {"config.json"}
    assert {p: d.rule for p, d in plan.items() if p != "config.json"} == names
    carried = {p for p, d in plan.items() if d.carried}
    assert carried == {"generation_config.json", "tokenizer.json", "merges.txt", "vocab.json", "chat_template.jinja",
                       "spiece.model", "added_tokens.json", "modeling_x.py", ".gitattributes", "my_notes.md"}
    assert plan["big.dat"].action == "drop" and "MiB" in plan["big.dat"].reason
    assert plan["README.md"].action == "drop" and plan["config.json"].action == "rewrite"
    assert all(d.reason for d in plan.values())
    # with a tokenizer object saved, the source's tokenizer files are not mixed in
    plan2 = {d.path: d for d in plan_carry(src, cfg, cfg, tokenizer_saved=True, card_written=True)}
    assert plan2["tokenizer.json"].action == "rewrite" and plan2["README.md"].action == "rewrite"
    assert plan_carry(tmp_path / "not-there", cfg, cfg) == []


# ---------------------------------------------------------------------- training from a checkpoint
def test_training_run_keeps_source_generation_config(tmp_path):
    from progtrain.train.config import from_dict
    from progtrain.train.engine import train

    tok = tiny_tokenizer()
    model = tiny_model("gpt2")
    model.generation_config = generation_settings(model)
    src = tmp_path / "src"
    model.save_pretrained(src)
    tok.save_pretrained(src)
    (src / "notes.txt").write_text("carried\n")
    cfg = from_dict({
        "output_dir": str(tmp_path / "run"), "seed": 0,
        "model": {"checkpoint": str(src), "task": "causal_lm"},
        "data": {"seq_len": 16, "tokenizer": str(src), "max_chars": 4000, "val_fraction": 0.1},
        "optim": {"lr": 1e-3, "warmup_steps": 1},
        "train": {"max_steps": 3, "batch_size": 2, "eval_interval": 3, "eval_batches": 1, "log_interval": 1},
        "stages": [{"name": "wide", "start_step": 2, "grow": {"hidden_size": 64, "num_heads": 8}}],
    })
    train(cfg)
    final = tmp_path / "run" / "final"
    assert GenerationConfig.from_pretrained(final) == model.generation_config
    assert T.AutoConfig.from_pretrained(final).n_embd == 64
    assert (final / "notes.txt").read_text() == "carried\n"


def test_carry_from_without_config_is_one_clear_error(tmp_path):
    from progtrain.errors import ProgtrainConfigError

    not_ckpt = tmp_path / "just_files"
    not_ckpt.mkdir()
    (not_ckpt / "notes.txt").write_text("x")
    with pytest.raises(ProgtrainConfigError, match=r"carry_from .* has no loadable config.json.*pass the source"):
        save_checkpoint(tiny_model("gpt2"), tmp_path / "out", carry_from=not_ckpt)
    assert not (tmp_path / "out").exists()
