"""Safe loading: pickle-only checkpoints are refused everywhere, and no pickle is ever executed."""

import ast
import json
import re
import shutil
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
import transformers as T

import progtrain
from progtrain.cli import main
from progtrain.errors import ProgtrainConfigError
from progtrain.io import load_model
from tiny_models import tiny_model


class Payload:
    """Unpickling this object creates the file ``path``: proof that a pickle was executed."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def write_pickle_weights(d: Path, marker: Path) -> None:
    """A `pytorch_model.bin` that holds the state dict AND an object whose unpickling creates ``marker``."""
    model = tiny_model("gpt2")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["_payload"] = Payload(str(marker))
    torch.save(state, d / "pytorch_model.bin")


@pytest.fixture
def pickle_only(tmp_path):
    d = tmp_path / "pickle_only"
    d.mkdir()
    tiny_model("gpt2").config.save_pretrained(d)
    marker = tmp_path / "PICKLE_WAS_EXECUTED"
    write_pickle_weights(d, marker)
    return d, marker


@pytest.fixture
def safe_dir(tmp_path):
    d = tmp_path / "safe"
    tiny_model("gpt2").save_pretrained(d)
    return d


def test_payload_is_live(pickle_only):
    """The test file really executes code when unpickled (so the refusals below mean something)."""
    d, marker = pickle_only
    torch.load(d / "pytorch_model.bin", weights_only=False)
    assert marker.exists()


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def assert_refused(code, err, d):
    lines = [l for l in err.strip().splitlines() if l.strip() and not re.search(r"\d+%\|", l)]  # no progress bars
    assert code == 2 and len(lines) == 1, err
    assert "pickle" in lines[0] and "pytorch_model.bin" in lines[0] and str(d) in lines[0]
    assert "safetensors" in lines[0] and "Convert" in lines[0] and "save_pretrained" in lines[0]


def test_load_model_refuses_pickle_only(pickle_only):
    d, marker = pickle_only
    with pytest.raises(ProgtrainConfigError, match=r"only pickle-based weights .*Convert once"):
        load_model(str(d))
    assert not marker.exists()


def test_cli_grow_refuses_pickle_only(pickle_only, tmp_path, capsys):
    d, marker = pickle_only
    out = tmp_path / "out"
    code, _, err = run(capsys, "grow", d, out, "--hidden-size", 64)
    assert_refused(code, err, d)
    assert not out.exists() and not marker.exists()


@pytest.mark.parametrize("which", ["src", "out"])
def test_cli_verify_refuses_pickle_only(pickle_only, safe_dir, capsys, which):
    d, marker = pickle_only
    args = (d, safe_dir) if which == "src" else (safe_dir, d)
    code, _, err = run(capsys, "verify", *args)
    assert_refused(code, err, d)
    assert not marker.exists()


def test_cli_push_refuses_pickle_only(pickle_only, capsys, monkeypatch):
    d, marker = pickle_only
    monkeypatch.setenv("HF_TOKEN", "hf_" + "s" * 30)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # refused before any connection is tried
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    code, _, err = run(capsys, "push", d, "someone/model")
    assert_refused(code, err, d)
    assert not marker.exists()


def test_safetensors_preferred_when_both_exist(pickle_only, safe_dir, tmp_path, capsys):
    """A directory with safetensors AND a pickle loads and grows from the safetensors; the pickle is never opened."""
    d, marker = pickle_only
    both = tmp_path / "both"
    shutil.copytree(safe_dir, both)
    shutil.copy(d / "pytorch_model.bin", both / "pytorch_model.bin")
    m = load_model(str(both))
    ref = tiny_model("gpt2")
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), ref.state_dict().values()))
    code, out, err = run(capsys, "grow", both, tmp_path / "grown", "--hidden-size", 64)
    assert code == 0, err
    assert not marker.exists()
    assert not (tmp_path / "grown" / "pytorch_model.bin").exists()


def write_trusted_pickle(d: Path, model) -> None:
    """A pickle-only checkpoint (config + ``pytorch_model.bin`` holding only tensors) of ``model``."""
    d.mkdir()
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(d)
    torch.save({k: v.clone().contiguous() for k, v in model.state_dict().items()}, d / "pytorch_model.bin")


def refusal_advice(d: Path, task=None) -> str:
    with pytest.raises(ProgtrainConfigError) as e:
        load_model(str(d), task=task)
    return str(e.value).split("Convert once in a trusted environment: ", 1)[1]


@pytest.mark.parametrize("family,tie", [("gpt2", False), ("gpt2", True), ("bert", False), ("llama", False)])
def test_conversion_advice_keeps_the_model(tmp_path, family, tie):
    """Following the printed advice (in a trusted environment) gives a checkpoint of the same class
    holding every weight of the original (the LM head included), with identical logits."""
    model = tiny_model(family, tie=tie)
    d = tmp_path / "trusted_pickle"
    write_trusted_pickle(d, model)
    advice = refusal_advice(d)
    assert f"from transformers import {type(model).__name__};" in advice and "AutoModel" not in advice
    exec(advice, {})  # the advice, exactly as printed
    loaded = load_model(str(d))
    assert type(loaded) is type(model)
    want, got = model.state_dict(), loaded.state_dict()
    assert set(got) == set(want)
    assert all(torch.equal(got[k], want[k]) for k in want)
    if not tie and family != "bert":
        assert not torch.equal(got["lm_head.weight"], got[next(k for k in got if "embed" in k or "wte" in k)])
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_cli_grow_advice_names_the_class(tmp_path, capsys):
    """The CLI's one-line refusal carries the same class-naming advice."""
    model = tiny_model("gpt2", tie=False)
    d = tmp_path / "trusted_pickle"
    write_trusted_pickle(d, model)
    code, _, err = run(capsys, "grow", d, tmp_path / "out", "--hidden-size", 64)
    assert_refused(code, err, d)
    assert "from transformers import GPT2LMHeadModel; GPT2LMHeadModel.from_pretrained(" in err


@pytest.mark.parametrize("task,cls", [(None, "AutoModel"), ("causal_lm", "AutoModelForCausalLM"),
                                      ("masked_lm", "AutoModelForMaskedLM")])
def test_conversion_advice_without_architectures_uses_the_task(tmp_path, task, cls):
    """A config that names no class: the Auto class of the task asked for; with no task, AutoModel
    and a hint that a head needs the task's Auto class."""
    model = tiny_model("gpt2")
    d = tmp_path / "no_arch"
    write_trusted_pickle(d, model)
    cfg = json.loads((d / "config.json").read_text())
    del cfg["architectures"]
    (d / "config.json").write_text(json.dumps(cfg))
    advice = refusal_advice(d, task)
    assert advice.startswith(f"from transformers import {cls}; {cls}.from_pretrained(")
    assert ("names no architecture" in advice) == (task is None)


def test_conversion_advice_custom_code(tmp_path):
    """Custom code: the Auto class that auto_map binds to the checkpoint's class, with trust_remote_code."""
    from progtrain.io import conversion_command

    d = tmp_path / "custom"
    d.mkdir()
    (d / "config.json").write_text(
        '{"model_type": "mine", "architectures": ["MyForCausalLM"], "auto_map": {"AutoConfig": '
        '"configuration_mine.MyConfig", "AutoModel": "modeling_mine.MyModel", '
        '"AutoModelForCausalLM": "modeling_mine.MyForCausalLM"}}')
    cmd = conversion_command(d)
    assert cmd == (f"from transformers import AutoModelForCausalLM; AutoModelForCausalLM.from_pretrained("
                   f"{str(d)!r}, trust_remote_code=True).save_pretrained({str(d)!r})")


@pytest.mark.parametrize("cls,want", [
    (T.GPT2LMHeadModel, "AutoModelForCausalLM"), (T.BertForMaskedLM, "AutoModelForMaskedLM"),
    (T.BertForSequenceClassification, "AutoModelForSequenceClassification"),
    (T.BertForTokenClassification, "AutoModelForTokenClassification"),
    (T.BertForQuestionAnswering, "AutoModelForQuestionAnswering"), (T.BertModel, "AutoModel"),
    (T.BertForPreTraining, "BertForPreTraining"),
])
def test_card_usage_loader_keeps_the_head(cls, want):
    """The model card's usage snippet names a class that loads the checkpoint with its head."""
    from progtrain.card import loader_class_for

    cfg = (T.GPT2Config if cls is T.GPT2LMHeadModel else T.BertConfig)()
    cfg.architectures = [cls.__name__]
    assert loader_class_for(cfg) == want
    loader = getattr(T, want)
    if want.startswith("Auto"):
        assert loader._model_mapping[type(cfg)] is cls


def _torch_load_calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            owner = node.func.value
            name = owner.id if isinstance(owner, ast.Name) else None
            if (name, node.func.attr) in (("torch", "load"), ("pickle", "load"), ("pickle", "loads"),
                                          ("dill", "load"), ("joblib", "load")):
                yield name, node


def test_library_never_unpickles_without_weights_only():
    """Every ``torch.load`` in progtrain passes ``weights_only=True``; nothing calls pickle/dill/joblib load."""
    bad = []
    root = Path(progtrain.__file__).parent
    for f in sorted(root.rglob("*.py")):
        for name, node in _torch_load_calls(ast.parse(f.read_text(), str(f))):
            kw = {k.arg: k.value for k in node.keywords}
            ok = name == "torch" and isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True
            if not ok:
                bad.append(f"{f.relative_to(root)}:{node.lineno}")
    assert not bad, f"unsafe loads: {bad}"
