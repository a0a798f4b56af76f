"""Grown models save as standard HF checkpoints that plain transformers reloads (in a subprocess
that never imports progtrain) with no missing/unexpected keys and the same outputs."""

import json
import subprocess
import sys
import textwrap

import torch

from progtrain import grow
from progtrain.io import read_growth_history, save_checkpoint
from tiny_models import tiny_model

CASES = {
    "gpt2_tied": ("gpt2", dict(tie=True), dict(hidden_size=64, num_heads=8, num_layers=3), "AutoModelForCausalLM"),
    "gpt2_base": ("gpt2", dict(head=False), dict(hidden_size=48), "AutoModel"),
    "bert_mlm": ("bert", dict(), dict(hidden_size=64, intermediate_size=128), "AutoModelForMaskedLM"),
    "bert_base": ("bert", dict(head=False), dict(hidden_size=64, num_heads=8), "AutoModel"),
    "llama_gqa": ("llama", dict(kv=2), dict(hidden_size=64, num_heads=8, num_layers=4), "AutoModelForCausalLM"),
    "llama_tied": ("llama", dict(kv=1, tie=True), dict(hidden_size=48, intermediate_size=96), "AutoModelForCausalLM"),
    "mistral": ("mistral", dict(kv=1), dict(num_heads=8, num_kv_heads=2), "AutoModelForCausalLM"),
    "qwen2": ("qwen2", dict(kv=2), dict(hidden_size=64, num_layers=3), "AutoModelForCausalLM"),
    "gpt_neox": ("gpt_neox", dict(), dict(hidden_size=64, num_layers=3), "AutoModelForCausalLM"),
    "gemma_tied": ("gemma", dict(kv=2), dict(hidden_size=64, num_heads=8, num_layers=3), "AutoModelForCausalLM"),
    "gemma2": ("gemma2", dict(kv=1, tie=False), dict(hidden_size=48, num_kv_heads=2, num_layers=3), "AutoModelForCausalLM"),
    "gemma3_text": ("gemma3_text", dict(kv=2), dict(hidden_size=64, intermediate_size=96, num_layers=4),
                    "AutoModelForCausalLM"),
    "gemma3_base": ("gemma3_text", dict(head=False), dict(hidden_size=48), "AutoModel"),
    "opt": ("opt", dict(), dict(hidden_size=64, num_heads=8, num_layers=3), "AutoModelForCausalLM"),
    "gptj": ("gptj", dict(), dict(hidden_size=48, intermediate_size=192, num_layers=3), "AutoModelForCausalLM"),
    "roberta_mlm": ("roberta", dict(), dict(hidden_size=64, num_heads=8), "AutoModelForMaskedLM"),
    "roberta_base": ("roberta", dict(head=False), dict(hidden_size=64, intermediate_size=128), "AutoModel"),
    "qwen3": ("qwen3", dict(kv=2, bias=True), dict(hidden_size=48, num_heads=8, num_layers=3), "AutoModelForCausalLM"),
    "qwen3_base": ("qwen3", dict(kv=1, head=False), dict(hidden_size=64, num_kv_heads=2), "AutoModel"),
    "granite": ("granite", dict(kv=2, bias=True), dict(hidden_size=64, num_heads=8, num_layers=3), "AutoModelForCausalLM"),
    "granite_tied": ("granite", dict(kv=1, tie=True), dict(hidden_size=48, intermediate_size=96), "AutoModelForCausalLM"),
    "olmo2": ("olmo2", dict(kv=2, bias=True), dict(hidden_size=48, num_kv_heads=4, num_layers=3), "AutoModelForCausalLM"),
    "olmo2_heads": ("olmo2", dict(kv=1, tie=True), dict(hidden_size=64, num_heads=8, intermediate_size=96),
                    "AutoModelForCausalLM"),
    "stablelm": ("stablelm", dict(kv=2, bias=True), dict(hidden_size=48, intermediate_size=96, num_layers=3),
                 "AutoModelForCausalLM"),
    "stablelm_base": ("stablelm", dict(kv=4, head=False), dict(hidden_size=64, num_kv_heads=8), "AutoModel"),
    "phi3": ("phi3", dict(kv=2), dict(hidden_size=64, num_heads=8, num_kv_heads=4, intermediate_size=96,
                                      num_layers=3), "AutoModelForCausalLM"),
    "phi3_tied": ("phi3", dict(kv=1, tie=True), dict(hidden_size=48), "AutoModelForCausalLM"),
}

RELOAD = textwrap.dedent(
    """
    import json, sys, torch, transformers
    cases = json.loads(sys.argv[1])
    ids = torch.load(sys.argv[2])
    out = {}
    for name, (path, auto) in cases.items():
        model, info = getattr(transformers, auto).from_pretrained(path, output_loading_info=True)
        model.eval()
        with torch.no_grad():
            o = model(input_ids=ids)
        t = o.logits if getattr(o, "logits", None) is not None else o.last_hidden_state
        torch.save(t, path + "/reloaded.pt")
        out[name] = {"missing": list(info["missing_keys"]), "unexpected": list(info["unexpected_keys"]),
                     "cls": type(model).__name__}
    assert "progtrain" not in sys.modules
    print(json.dumps(out))
    """
)


def test_saved_checkpoints_reload_with_plain_transformers(tmp_path):
    ids = torch.randint(1, 101, (2, 12), generator=torch.Generator().manual_seed(0))
    torch.save(ids, tmp_path / "ids.pt")
    expected, cases = {}, {}
    for name, (fam, var, kw, auto) in CASES.items():
        model = tiny_model(fam, **var)
        res = grow(model, **kw)
        out = tmp_path / name
        save_checkpoint(res.model, out, history=[res.record])
        with torch.no_grad():
            o = res.model(input_ids=ids)
        expected[name] = (o.logits if getattr(o, "logits", None) is not None else o.last_hidden_state, type(res.model).__name__)
        cases[name] = (str(out), auto)
        assert not list(tmp_path.glob(f".{name}.tmp-*")), "temporary directory left behind"
        assert (out / "model.safetensors").exists() and (out / "config.json").exists()
        assert read_growth_history(out)[-1]["target"] == res.target_sizes.as_dict()
    proc = subprocess.run(
        [sys.executable, "-c", RELOAD, json.dumps(cases), str(tmp_path / "ids.pt")],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    for name, (t, cls) in expected.items():
        assert info[name]["missing"] == [] and info[name]["unexpected"] == [], (name, info[name])
        assert info[name]["cls"] == cls
        reloaded = torch.load(tmp_path / name / "reloaded.pt")
        assert torch.allclose(reloaded, t, rtol=0, atol=1e-5 * float(t.abs().max())), name


def test_sharded_safetensors_with_index_reload_with_plain_transformers(tmp_path):
    """Past ``max_shard_size`` the final model is sharded safetensors with an index (what a large
    run's ``final/`` holds at transformers' 50 GB default): plain transformers reloads it whole."""
    import transformers as T

    model = tiny_model("gpt2")
    total = sum(p.numel() * p.element_size() for p in model.state_dict().values())
    out = save_checkpoint(model, tmp_path / "final", max_shard_size=total // 4)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3 and not (out / "model.safetensors").exists()
    assert all((out / f).is_file() for f in shards)
    reloaded = T.AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(1, 101, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = model.eval()(input_ids=ids).logits, reloaded(input_ids=ids).logits
    assert torch.equal(a, b)
