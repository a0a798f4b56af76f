"""A grown checkpoint keeps its source's dtype (parameters, buffers, config, file size) unless asked
for another, is judged exact at the tolerance its dtype allows, and every file and directory
progtrain writes honours the umask (issue 13, items 2 and 6)."""

import json
import os
import re
import stat
from pathlib import Path

import pytest
import torch
import transformers as T
from safetensors import safe_open

from progtrain import grow
from progtrain.arch import get_adapter
from progtrain.cli import TOLERANCE_TEXT, main
from progtrain.errors import ProgtrainConfigError
from progtrain.io import read_growth_history, save_checkpoint
from progtrain.verify import model_outputs, random_inputs, tolerance_for
from tiny_models import FAMILIES, tiny_model

HALF = (torch.bfloat16, torch.float16)
DT_NAME = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
AUTO = {"bert": T.AutoModelForMaskedLM, "roberta": T.AutoModelForMaskedLM}


def sizes_for(family: str) -> dict:
    """Width, heads and (pre-norm families) depth growth of a tiny model; exact in exact arithmetic."""
    from progtrain.arch import get_adapter

    adapter = get_adapter(tiny_model(family).config)
    kw = {"hidden_size": 64, "num_heads": 8}
    if adapter.pre_norm:  # post-norm: depth growth is approximate
        kw["num_layers"] = 4
    if adapter.config_keys.get("kv_heads"):
        kw["num_kv_heads"] = 4
    if get_adapter(tiny_model(family).config).qk_norm == "projection":
        del kw["num_heads"]  # new heads change a projection-wide q/k norm: approximate by construction
    return kw


def cli_flags(kw: dict) -> list[str]:
    return [a for k, v in kw.items() for a in (f"--{k.replace('_', '-')}", str(v))]


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def safetensors_info(d: Path) -> tuple[set[str], int, int]:
    """(dtypes of the floating tensors, number of elements, bytes of the files) of a checkpoint dir."""
    dtypes, n = set(), 0
    files = sorted(d.glob("*.safetensors"))
    for f in files:
        with safe_open(str(f), "pt") as fh:
            for k in fh.keys():
                t = fh.get_tensor(k)
                n += t.numel()
                if t.is_floating_point():
                    dtypes.add(DT_NAME[t.dtype])
    return dtypes, n, sum(f.stat().st_size for f in files)


def layer_free(name: str) -> str:
    return re.sub(r"(?<=\.)\d+(?=\.)", "#", name)


def tensor_dtypes(model: torch.nn.Module) -> dict[str, torch.dtype]:
    """dtype of every parameter and buffer, by name with layer indices removed (checks that all
    layers of a kind agree)."""
    out: dict[str, torch.dtype] = {}
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        key = layer_free(name)
        assert out.setdefault(key, t.dtype) == t.dtype, f"{name}: layers disagree on dtype"
    return out


# ------------------------------------------------------------------ CLI: saved half-precision sources
@pytest.mark.parametrize(
    "family,dtype",
    [("llama", torch.bfloat16), ("gpt2", torch.float16), ("bert", torch.float32),
     ("qwen2", torch.float16), ("gpt_neox", torch.bfloat16), ("mistral", torch.bfloat16)],
    ids=lambda v: DT_NAME.get(v, v) if isinstance(v, torch.dtype) else v,
)
def test_cli_grow_keeps_the_saved_dtype(tmp_path, capsys, family, dtype):
    src, out = tmp_path / "src", tmp_path / "out"
    tiny_model(family).to(dtype).save_pretrained(src)
    kw = sizes_for(family)
    code, text, err = run(capsys, "grow", src, out, *cli_flags(kw))
    assert code == 0, err
    name = DT_NAME[dtype]
    assert f"dtype: {name} -> {name}" in text
    # weights, config and file size: the source's dtype
    src_dtypes, src_n, src_bytes = safetensors_info(src)
    out_dtypes, out_n, out_bytes = safetensors_info(out)
    assert src_dtypes == out_dtypes == {name}
    assert json.loads((out / "config.json").read_text())["dtype"] == name
    assert out_n > 2 * src_n
    assert abs((out_bytes / out_n) / (src_bytes / src_n) - 1) < 0.1  # bytes per parameter unchanged
    # plain transformers reloads it in that dtype
    cls = AUTO.get(family, T.AutoModelForCausalLM)
    reloaded = cls.from_pretrained(out)
    assert {p.dtype for p in reloaded.parameters()} == {dtype}
    assert reloaded.config.dtype == dtype
    # the recorded measurement is within the dtype's tolerance, and verify agrees
    rec = read_growth_history(out)[-1]
    assert rec["dtype"] == {"source": name, "grown": name}
    dev = rec["deviation"]
    assert dev["dtypes"] == [name, name] and dev["tolerance"] == tolerance_for(dtype)
    assert dev["rel"] <= tolerance_for(dtype)
    code, text, err = run(capsys, "verify", src, out, "--random", "--json")
    assert code == 0, text + err
    res = json.loads(text.strip().splitlines()[-1])
    assert res["tolerance"] == tolerance_for(dtype) and res["rel"] <= res["tolerance"]
    assert res["dtypes"] == [name, name]
    assert f"weights stored as {name} (SRC) and {name} (OUT)" in text


def test_cli_dtype_option_converts(tmp_path, capsys):
    src = tmp_path / "src"
    tiny_model("llama").to(torch.bfloat16).save_pretrained(src)
    out32 = tmp_path / "out32"
    code, text, err = run(capsys, "grow", src, out32, "--hidden-size", 64, "--dtype", "float32")
    assert code == 0, err
    assert "dtype: bfloat16 -> float32" in text
    assert safetensors_info(out32)[0] == {"float32"}
    assert json.loads((out32 / "config.json").read_text())["dtype"] == "float32"
    m = T.AutoModelForCausalLM.from_pretrained(out32)
    assert {p.dtype for p in m.parameters()} == {torch.float32}
    # the source's bf16 weights are the reference: its tolerance applies, and the fp32 copy is within it
    code, text, _ = run(capsys, "verify", src, out32, "--random", "--json")
    res = json.loads(text.strip().splitlines()[-1])
    assert code == 0 and res["tolerance"] == tolerance_for(torch.bfloat16) and res["rel"] <= 1e-5
    # and back down: an fp32 source saved as fp16
    src32 = tmp_path / "src32"
    tiny_model("gpt2").save_pretrained(src32)
    out16 = tmp_path / "out16"
    code, text, err = run(capsys, "grow", src32, out16, "--num-layers", 3, "--dtype", "float16")
    assert code == 0, err
    assert safetensors_info(out16)[0] == {"float16"}
    assert read_growth_history(out16)[-1]["deviation"]["tolerance"] == tolerance_for(torch.float16)
    code, text, _ = run(capsys, "verify", src32, out16, "--random")
    assert code == 0, text


def test_cli_rejects_unknown_dtype(tmp_path, capsys):
    src = tmp_path / "src"
    tiny_model("gpt2").save_pretrained(src)
    with pytest.raises(SystemExit) as e:
        main(["grow", str(src), str(tmp_path / "out"), "--num-layers", "3", "--dtype", "int8"])
    assert e.value.code == 2 and "--dtype" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    with pytest.raises(ProgtrainConfigError, match="dtype 'int8' is not supported"):
        grow(tiny_model("gpt2"), num_layers=3, dtype="int8")


def test_help_states_the_tolerances():
    import progtrain.verify as V

    def stated(text: str) -> list[float]:
        return [float(x) for x in re.findall(r"\d+(?:\.\d+)?e-\d+", text)]

    for dt in (torch.float32, torch.bfloat16, torch.float16):
        tol = tolerance_for(dt)
        for text in (TOLERANCE_TEXT, V.tolerance_for.__doc__, grow.__doc__):
            assert any(abs(x - tol) <= 5e-3 * tol for x in stated(text)), (dt, tol, text)
    assert tolerance_for(torch.bfloat16) == 2 * torch.finfo(torch.bfloat16).eps
    assert tolerance_for(torch.float16) == 2 * torch.finfo(torch.float16).eps
    assert tolerance_for("float32", "bfloat16") == tolerance_for(torch.bfloat16)  # the coarser decides
    assert tolerance_for() == 1e-5
    with pytest.raises(ValueError):
        tolerance_for(torch.int8)


# ------------------------------------------------------------------ in memory: every family, every tensor
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", HALF, ids=["bfloat16", "float16"])
def test_grow_in_memory_keeps_every_param_and_buffer_dtype(family, dtype, tmp_path):
    model = tiny_model(family).to(dtype)  # buffers too (rotary inv_freq becomes half)
    want = tensor_dtypes(model)
    res = grow(model, **sizes_for(family))
    got = tensor_dtypes(res.model)
    assert got == want  # same names (layer-free) and the same dtype, buffer by buffer
    assert res.model.config.dtype == dtype
    assert res.deviation["rel"] <= tolerance_for(dtype), res.deviation
    assert tensor_dtypes(model) == want  # the source is left as it was
    # saved, the checkpoint reloads in that dtype with plain transformers
    save_checkpoint(res.model, tmp_path / "out")
    assert safetensors_info(tmp_path / "out")[0] == {DT_NAME[dtype]}
    cls = AUTO.get(family, T.AutoModelForCausalLM)
    assert {p.dtype for p in cls.from_pretrained(tmp_path / "out").parameters()} == {dtype}


@pytest.mark.parametrize("family", ["llama", "gpt_neox"])
def test_grow_mirrors_buffers_kept_in_fp32(family, tmp_path):
    """transformers loads a bf16 checkpoint with rotary inv_freq in fp32: the grown model does too
    (per buffer, not a blanket cast of every buffer to the parameters' dtype)."""
    tiny_model(family).to(torch.bfloat16).save_pretrained(tmp_path / "src")
    model = T.AutoModelForCausalLM.from_pretrained(tmp_path / "src")
    want = tensor_dtypes(model)
    assert torch.float32 in want.values() and torch.bfloat16 in want.values()  # a mixed model
    res = grow(model, **sizes_for(family))
    assert tensor_dtypes(res.model) == want
    # an explicit dtype: parameters in it, buffers as the model class builds them at that dtype
    res16 = grow(model, dtype="float16", **sizes_for(family))
    built = T.AutoModelForCausalLM.from_config(res16.model.config, dtype=torch.float16)
    assert tensor_dtypes(res16.model) == tensor_dtypes(built)
    assert res16.model.config.dtype == torch.float16


def test_fp32_evaluation_leaves_the_model_alone_and_catches_real_changes():
    model = tiny_model("llama").to(torch.bfloat16)
    ids = random_inputs(model, 2, 16)
    before = {n: t.clone() for n, t in model.state_dict().items()}
    _, a = model_outputs(model, ids, compute_dtype=torch.float32)
    _, b = model_outputs(model.float(), ids)  # the model's own weights, upcast (exact)
    assert torch.equal(a, b)
    model.to(torch.bfloat16)
    assert all(torch.equal(before[n], t) and before[n].dtype == t.dtype for n, t in model.state_dict().items())
    # a growth that changes the function by more than the tolerance is not hidden by bf16 rounding
    res = grow(model, hidden_size=64)
    with torch.no_grad():
        res.model.model.layers[0].mlp.down_proj.weight.mul_(1.1)
    from progtrain.verify import measure_deviation

    dev = measure_deviation(model, res.model, maps=res.maps)
    assert dev["rel"] > tolerance_for(torch.bfloat16), dev


def test_baked_copy_keeps_buffer_dtypes():
    """Saving a parametrised model (e.g. mixture templates) goes through a baked copy: each buffer
    keeps its own dtype instead of being cast to the parameters'."""
    from torch.nn.utils import parametrize

    from progtrain.bake import baked_copy

    class Twice(torch.nn.Module):
        def forward(self, w):
            return 2 * w

    model = tiny_model("llama").to(torch.bfloat16)
    model.model.rotary_emb.inv_freq = model.model.rotary_emb.inv_freq.float()  # as from_pretrained leaves it
    parametrize.register_parametrization(model.model.layers[0].mlp.up_proj, "weight", Twice())
    plain = baked_copy(model)
    assert not parametrize.is_parametrized(plain.model.layers[0].mlp.up_proj)
    assert plain.model.rotary_emb.inv_freq.dtype == torch.float32
    assert plain.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    assert torch.equal(plain.model.rotary_emb.inv_freq, model.model.rotary_emb.inv_freq)


# ------------------------------------------------------------------ permissions
@pytest.fixture
def umask():
    """Set the process umask for a test and restore it afterwards."""
    old = os.umask(0o022)
    os.umask(old)
    yield lambda m: os.umask(m)
    os.umask(old)


def modes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root.parent)): stat.S_IMODE(p.stat().st_mode) for p in [root, *root.rglob("*")]}


def assert_modes(root: Path, dir_mode: int, file_mode: int) -> None:
    got = modes(root)
    bad = {p: oct(m) for p, m in got.items()
           if m != (dir_mode if (root.parent / p).is_dir() else file_mode)}
    assert not bad, f"expected dirs {oct(dir_mode)}, files {oct(file_mode)}: {bad}"
    assert any(p.endswith(".safetensors") for p in got)


@pytest.mark.parametrize("mask,dir_mode,file_mode", [(0o022, 0o755, 0o644), (0o077, 0o700, 0o600), (0o002, 0o775, 0o664)],
                         ids=["umask022", "umask077", "umask002"])
def test_grow_output_honours_umask(tmp_path, capsys, umask, mask, dir_mode, file_mode):
    src, out = tmp_path / "src", tmp_path / "out"
    tiny_model("gpt2").save_pretrained(src)
    umask(mask)
    code, _, err = run(capsys, "grow", src, out, "--num-layers", 3)
    assert code == 0, err
    assert_modes(out, dir_mode, file_mode)
    # replacing it with --overwrite too
    code, _, err = run(capsys, "grow", src, out, "--num-layers", 4, "--overwrite")
    assert code == 0, err
    assert_modes(out, dir_mode, file_mode)


@pytest.mark.parametrize("mask,dir_mode,file_mode", [(0o022, 0o755, 0o644), (0o077, 0o700, 0o600)],
                         ids=["umask022", "umask077"])
def test_training_checkpoint_honours_umask(tmp_path, umask, mask, dir_mode, file_mode):
    from progtrain.train import checkpoint as ckpt

    umask(mask)
    model = tiny_model("gpt2")
    moments = {n: {"exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)} for n, p in model.named_parameters()}
    path = ckpt.save_checkpoint(tmp_path / "run", model=model, moments=moments, opt_step=3,
                                state={"step": 3}, rng=[])
    assert (path / "model").is_dir() and (path / "optimizer.pt").exists()
    assert_modes(path, dir_mode, file_mode)


def test_training_run_outputs_honour_umask(tmp_path, umask):
    """Everything a progressive run writes (checkpoints, final model, metrics, card, plot) is
    readable by the group and others under umask 022."""
    from progtrain.train.config import from_dict
    from progtrain.train.data import load_texts, train_tokenizer
    from progtrain.train.engine import train

    umask(0o022)
    base = {"model": {"family": "gpt2", "config": {"n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 64}},
            "data": {"seq_len": 32, "max_chars": 60_000, "val_fraction": 0.05}}
    cfg = from_dict({**base, "train": {"max_steps": 2}})
    train_tokenizer(load_texts(cfg.data).train, 300, "causal_lm").save_pretrained(tmp_path / "tok")
    cfg = from_dict({
        **base,
        "output_dir": str(tmp_path / "run"),
        "data": {**base["data"], "tokenizer": str(tmp_path / "tok")},
        "train": {"max_steps": 4, "batch_size": 4, "eval_interval": 2, "eval_batches": 1, "log_interval": 1,
                  "checkpoint_interval": 2, "keep_checkpoints": 1},
        "stages": [{"name": "wide", "start_step": 2, "grow": {"hidden_size": 64, "num_heads": 8}}],
    })
    summary = train(cfg)
    run_dir = Path(summary["output_dir"])
    assert (run_dir / "final" / "model.safetensors").exists()
    assert any(p.name.startswith("checkpoint") for p in run_dir.iterdir())
    assert_modes(run_dir, 0o755, 0o644)
