"""Single-process progressive runs end to end: growth in hidden size and depth, exactness through
training, reloadable final model, metrics that match a fresh evaluation."""

import json

import pytest
import torch
import transformers as T

from progtrain.train.config import from_dict
from progtrain.train.data import prepare_data, train_tokenizer, load_texts
from progtrain.train.engine import evaluate, train
from progtrain.train.flops import plan
from progtrain.train.report import read_metrics

CHARS = 150_000


def cached_tokenizer(tmp_path_factory, task):
    """A ~400-token byte-level BPE trained once per session on the start of the embedded corpus."""
    path = tmp_path_factory.getbasetemp() / f"tok_{task}"
    if not path.exists():
        cfg = from_dict({"model": {"family": "gpt2" if task == "causal_lm" else "bert", "task": task},
                         "data": {"max_chars": CHARS}, "train": {"max_steps": 2}})
        train_tokenizer(load_texts(cfg.data).train, 400, task).save_pretrained(path)
    return str(path)


def run_config(out, tok, **extra):
    d = {
        "output_dir": str(out),
        "seed": 3,
        "model": {"family": "gpt2", "config": {"n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 64}},
        "data": {"seq_len": 32, "tokenizer": tok, "max_chars": CHARS, "val_fraction": 0.05},
        "optim": {"lr": 3e-3, "warmup_steps": 3},
        "train": {"max_steps": 14, "batch_size": 8, "eval_interval": 7, "eval_batches": 2, "log_interval": 1},
        "stages": [{"name": "wide", "start_step": 5, "grow": {"hidden_size": 64, "num_heads": 8}},
                   {"name": "deep", "start_step": 10, "grow": {"num_layers": 4}}],
    }
    for k, v in extra.items():
        d[k] = {**d[k], **v} if isinstance(v, dict) and isinstance(d.get(k), dict) else v
    return from_dict(d)


@pytest.fixture(scope="module")
def gpt_run(tmp_path_factory):
    tok = cached_tokenizer(tmp_path_factory, "causal_lm")
    cfg = run_config(tmp_path_factory.mktemp("gpt") / "run", tok)
    summary = train(cfg)
    return cfg, summary


def test_two_growths_reload_and_metrics_match(gpt_run):
    cfg, summary = gpt_run
    out = summary["output_dir"]
    model = T.AutoModelForCausalLM.from_pretrained(f"{out}/final")  # plain transformers
    assert type(model).__name__ == "GPT2LMHeadModel"
    assert (model.config.n_embd, model.config.n_head, model.config.n_layer) == (64, 8, 4)
    metrics = read_metrics(f"{out}/metrics.jsonl")
    assert metrics[0]["world_size"] == 1 and metrics[0]["engine"] == "single"
    info = json.loads(open(f"{out}/run_info.json").read())
    assert info["world_size"] == 1 and info["engine"] == "single"
    # the logged final validation loss equals a fresh evaluation of the reloaded model
    last_eval = [m for m in metrics if m["event"] == "eval"][-1]
    assert last_eval["step"] == cfg.train.max_steps
    data = prepare_data(cfg, out)
    val = torch.utils.data.DataLoader(data.val_set(cfg.train.eval_batches * cfg.train.batch_size), batch_size=8)
    fresh = evaluate(model, val, causal=True)
    assert abs(fresh - last_eval["val_loss"]) < 1e-4
    # outputs: card, plot, tokenizer, growth history with both growths
    for f in ("README.md", "loss_vs_flops.png", "final/README.md", "final/tokenizer.json", "final/progtrain_growth.json"):
        assert (summary and __import__("pathlib").Path(out, f).is_file()), f
    hist = json.loads(open(f"{out}/final/progtrain_growth.json").read())["history"]
    assert [h["stage_name"] for h in hist] == ["wide", "deep"]
    # cumulative FLOPs equal the plan's total for the same schedule
    train_lines = [m for m in metrics if m["event"] == "train"]
    assert train_lines[-1]["flops"] == pytest.approx(plan(cfg, vocab_size=len(data.tokenizer))[-2]["flops"], rel=1e-9)
    assert train_lines[-1]["tokens"] == cfg.train.max_steps * cfg.tokens_per_step
    assert all(m["train_loss"] is not None and m["lr"] > 0 for m in train_lines)


def test_function_preserving_growth_keeps_eval_loss(gpt_run):
    cfg, summary = gpt_run
    growths = [m for m in read_metrics(f"{summary['output_dir']}/metrics.jsonl") if m["event"] == "growth"]
    assert [g["step"] for g in growths] == [5, 10]
    for g in growths:
        assert g["exact"]
        assert g["val_loss_after"] == pytest.approx(g["val_loss_before"], rel=1e-5)
    # training went on after each growth: the loss still falls below the pre-growth level by the end
    assert summary["final"]["val_loss"] < growths[0]["val_loss_before"]


def test_bert_mlm_run(tmp_path_factory):
    tok = cached_tokenizer(tmp_path_factory, "masked_lm")
    cfg = run_config(
        tmp_path_factory.mktemp("bert") / "run", tok,
        model={"family": "bert", "task": "masked_lm",
               "config": {"hidden_size": 32, "num_attention_heads": 4, "intermediate_size": 64,
                          "num_hidden_layers": 2, "max_position_embeddings": 64}},
        train={"max_steps": 6, "eval_interval": 3},
        stages=[{"name": "wide", "start_step": 3, "grow": {"hidden_size": 64, "intermediate_size": 128}}],
    )
    summary = train(cfg)
    model = T.AutoModelForMaskedLM.from_pretrained(f"{summary['output_dir']}/final")
    assert model.config.hidden_size == 64 and model.config.intermediate_size == 128
    g = [m for m in read_metrics(f"{summary['output_dir']}/metrics.jsonl") if m["event"] == "growth"][0]
    assert g["val_loss_after"] == pytest.approx(g["val_loss_before"], rel=1e-5)  # integer widening is exact


def test_non_finite_loss_stops_with_step_stage_and_checkpoint(tmp_path_factory):
    from progtrain.errors import TrainingDivergedError

    tok = cached_tokenizer(tmp_path_factory, "causal_lm")
    out = tmp_path_factory.mktemp("nan") / "run"
    cfg = run_config(out, tok, optim={"lr": 1e30, "warmup_steps": 0, "max_grad_norm": 0.0},
                     train={"max_steps": 6, "eval_interval": 0, "checkpoint_interval": 1}, stages=[])
    with pytest.raises(TrainingDivergedError) as e:
        train(cfg)
    msg = str(e.value)
    assert "non-finite loss at step" in msg and "(stage 0)" in msg
    step = int(msg.split("at step ")[1].split()[0])
    assert f"step-{step - 1:08d}" in msg  # the last good checkpoint is the step before


def test_run_model_card_front_matter_and_growth_table(gpt_run):
    """The final model's README.md: Hub front matter that parses, and one growth-table row per stage
    with the sizes, steps and init of the run."""
    from progtrain.card import parse_front_matter

    cfg, summary = gpt_run
    card = (summary["model_dir"] and open(f"{summary['model_dir']}/README.md").read())
    meta = parse_front_matter(card)
    assert meta["library_name"] == "transformers" and "progressive-training" in meta["tags"]
    lines = card.splitlines()
    head = lines.index(next(line for line in lines if line.startswith("| stage | name | hidden")))
    cols = [c.strip() for c in lines[head].strip("|").split("|")]
    assert lines[head + 1].replace(" ", "").strip("|").split("|") == ["---"] * len(cols)
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[head + 2:head + 5]]
    assert all(len(r) == len(cols) for r in rows)
    got = {r[cols.index("name")]: (r[cols.index("hidden")], r[cols.index("layers")], r[cols.index("steps")],
                                   r[cols.index("init")]) for r in rows}
    assert got == {"initial": ("32", "2", "5", "-"), "wide": ("64", "2", "5", "function_preserving"),
                   "deep": ("64", "4", "4", "function_preserving")}
    assert not lines[head + 5].startswith("|")  # three stages, three rows
