"""Every command the documentation shows runs: the README, launch/README.md, the ``Example:`` lines of
``progtrain COMMAND --help``, the recipes' docstrings and the shipped configs' header comments.

Each command is taken as written (optional ``[...]`` parts dropped, placeholders such as ``CONFIG`` or
``N`` filled in) and run in-process for a few steps in a scratch directory whose ``configs/``,
``recipes/`` and ``launch/`` link to the repository's, with tiny sizes appended as ``--set`` overrides
(``train.max_steps=6``, short sequences, a small corpus), so the whole test takes seconds per command.
Commands that need the network, a GPU, several processes or machines are listed as skipped with the
reason (the 2-process launches run in tests/test_distributed.py).
"""

from __future__ import annotations

import contextlib
import io
import re
import runpy
import shlex
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = "configs/gpt2_tiny_progressive.yaml"
# appended to every training command: a run of 6 steps (the fraction-based stages grow at steps 2 and
# 4), batches of 4 sequences of 32 tokens, a 512-token vocabulary trained on 200k characters
TINY = ["train.max_steps=6", "train.batch_size=4", "train.eval_batches=1", "train.log_interval=1",
        "data.seq_len=32", "data.vocab_size=512", "data.max_chars=200000", "data.val_fraction=0.05"]
COMMAND = re.compile(r"^(?:[A-Z_]+=\S+\s+)*(progtrain|python|accelerate|pip|hf|sbatch)\s")


# ---------------------------------------------------------------------- extraction
def _markdown_commands(path: Path) -> list[str]:
    """Shell lines of the ```bash blocks (continuations joined, comments dropped) and inline
    `code` spans that start like a command."""
    text = path.read_text()
    out = []
    for block in re.findall(r"^```(?:bash|sh)\n(.*?)^```", text, flags=re.S | re.M):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line and not line.startswith("#"):
                out.append(line)
    body = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    # an inline span is a command when it has an argument too (`progtrain train CONFIG`, not `progtrain train`)
    out += [c.strip() for c in re.findall(r"`([^`\n]+)`", body) if COMMAND.match(c.strip()) and len(c.split()) >= 3]
    return out


def _help_commands() -> list[str]:
    """The ``Example:`` commands in the descriptions of ``progtrain COMMAND --help``."""
    from progtrain.cli import build_parser

    out, todo = [], [build_parser()]
    while todo:
        p = todo.pop()
        for line in (p.description or "").splitlines():
            if line.strip().startswith("progtrain "):
                out.append(line.strip())
        for a in p._actions:  # argparse keeps sub-parsers only here
            if isinstance(a.choices, dict):
                todo += list(a.choices.values())
    return out


def _docstring_commands(path: Path) -> list[str]:
    """Indented command lines of a recipe's docstring or of a config's header comments."""
    out = []
    for line in path.read_text().splitlines():
        line = line.lstrip("#").strip()
        if COMMAND.match(line):
            out.append(line)
    return out


def documented_commands() -> list[tuple[str, str]]:
    """``(where, command)`` for every command shown, first occurrence of each kept."""
    found: list[tuple[str, str]] = []
    for doc in (REPO / "README.md", REPO / "launch" / "README.md"):
        found += [(doc.relative_to(REPO).as_posix(), c) for c in _markdown_commands(doc)]
    found += [("--help", c) for c in _help_commands()]
    for path in sorted((REPO / "recipes").glob("*.py")) + sorted((REPO / "configs").glob("*.yaml")):
        found += [(path.relative_to(REPO).as_posix(), c) for c in _docstring_commands(path)]
    seen, out = set(), []
    for where, cmd in found:
        for part in cmd.split("&&"):  # `pip install ... && progtrain train ...`
            part = part.strip()
            if part and part not in seen:
                seen.add(part)
                out.append((where, part))
    return out


# ---------------------------------------------------------------------- what runs, what is skipped
FILL = {"CONFIG": TINY_CONFIG, "$CFG": TINY_CONFIG, "N": "4", "DIR": "out_dir", "COMMAND": "train"}


def _drop_optional(cmd: str) -> str:
    """``cmd`` without its optional ``[...]`` parts."""
    return re.sub(r"(?<!\S)\[[^\[\]]*\]", "", cmd)


def skip_reason(cmd: str) -> str | None:
    """Why a documented command is not run here (None: it runs)."""
    words = shlex.split(_drop_optional(cmd))
    while words and re.match(r"^[A-Z_]+=", words[0]):
        words = words[1:]
    if not words:
        return "environment settings only"
    head = " ".join(words[:2])
    if words[0] == "pip":
        return "installs packages (needs the network)"
    if words[0] == "hf" or head == "progtrain push" or "push_to_hub" in cmd:
        return "talks to the Hugging Face Hub (tests/test_hub_push.py uses a local Hub server)"
    if words[0] == "sbatch" or "--machine_rank" in words or "multinode.yaml" in cmd:
        return "multi-node (Slurm)"
    if words[0] == "python" and words[1:3] == ["-m", "pytest"]:
        return "the test suite itself"
    if words[0] == "python" and words[1].startswith("benchmarks/"):
        return "a benchmark (minutes to hours; its results are in the README)"
    if words[0] == "accelerate":
        conf = words[words.index("--config_file") + 1] if "--config_file" in words else None
        if conf and ("gpu" in conf or conf.endswith("fsdp.yaml")):
            return f"needs GPUs ({conf})"
        if conf and conf != "launch/cpu_single.yaml" or {"--multi_gpu", "--use_deepspeed"} & set(words):
            return "launches 2 processes (tests/test_distributed.py runs the CPU launches)"
        if "SCRIPT" in words:
            return "a template (SCRIPT stands for a recipe)"
    if words[0] == "export":
        return "environment settings only"
    if words[0] == "accelerate" and not any(w.endswith(".py") for w in words):
        return "a launch form without a script"
    if "..." in words or any(re.fullmatch(r"[A-Z_]{3,}(=[A-Z_]+)?", w) and w not in FILL for w in words):
        return "a template, not a complete command"
    if words[0] == "progtrain" and "--help" not in words and not any("/" in w for w in words[1:]):
        return "names a command without its arguments"
    return None


def normalise(cmd: str, out_dir: str) -> list[str]:
    """The argv to run in-process: env prefixes and ``accelerate launch [--config_file F]`` dropped,
    optional ``[...]`` parts removed, placeholders filled, tiny sizes appended to training commands."""
    words = shlex.split(_drop_optional(cmd))
    while re.match(r"^[A-Z_]+=", words[0]):
        words = words[1:]
    if words[0] == "accelerate":
        words = words[2:]
        if words[0] == "--config_file":
            words = words[2:]
        words = ["python"] + words
    words = [FILL.get(w, w) for w in words]
    if "out_dir" in words:
        words[words.index("out_dir")] = out_dir
    trains = words[:2] == ["progtrain", "train"] or (words[0] == "python" and words[1].startswith("recipes/"))
    prepares = words[:3] == ["progtrain", "data", "prepare"] or words[:2] == ["progtrain", "eval"]
    if (trains or prepares) and "--help" not in words:
        config = next((w for w in words if w.startswith("configs/")), None) or (
            "configs/bert_tiny_progressive.yaml" if "pretrain_bert" in words[1] else TINY_CONFIG)
        sets = list(TINY)
        if "bert" in config:
            sets.append("stages.1.fade_in_steps=1")  # 50 fade-in steps do not fit in a 6-step run
        if "minilm_expand" in config:
            sets.append("stages.0.fade_in_steps=1")  # nor 20
        if "--output-dir" not in words and words[:2] != ["progtrain", "eval"]:  # eval reads the run it names
            words += ["--output-dir", out_dir]
        for s in sets:
            words += ["--set", s]
    return words


def run_in_process(argv: list[str]) -> tuple[int, str]:
    """Run ``progtrain ...`` or ``python recipes/X.py ...``; returns (exit code, stderr)."""
    err = io.StringIO()
    old = sys.argv
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            if argv[0] == "progtrain":
                from progtrain.cli import main

                return main(argv[1:]), err.getvalue()
            assert argv[0] == "python", argv
            sys.argv = argv[1:]
            runpy.run_path(argv[1], run_name="__main__")
            return 0, err.getvalue()
        except SystemExit as e:  # argparse's --help, the recipes' sys.exit
            return int(e.code or 0), err.getvalue()
        finally:
            sys.argv = old


COMMANDS = documented_commands()


def _first_same(where: str, cmd: str) -> str | None:
    """The earlier documented command that runs the same argv, if any (it is run once)."""
    argv = normalise(cmd, "OUT")
    for w, c in COMMANDS[: COMMANDS.index((where, cmd))]:
        if skip_reason(c) is None and normalise(c, "OUT") == argv:
            return f"{w}: {c}"
    return None


def test_documented_commands_found():
    text = "\n".join(c for _, c in COMMANDS)
    for expected in ("progtrain train configs/gpt2_tiny_progressive.yaml --set train.max_steps=300",
                     "progtrain plan", "progtrain grow ./small ./big", "progtrain verify",
                     "recipes/pretrain_bert.py", "progtrain data prepare"):
        assert expected in text, expected
    wheres = {w for w, _ in COMMANDS}
    assert {"README.md", "launch/README.md", "--help", "recipes/pretrain_gpt.py"} <= wheres, wheres
    runnable = [c for _, c in COMMANDS if skip_reason(c) is None]
    assert len(runnable) >= 10, runnable


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A scratch directory with the repository's configs/recipes/launch, a tiny GPT-2 checkpoint at
    ./small (for the grow and verify examples) and a text corpus at ./corpus."""
    d = tmp_path_factory.mktemp("docs")
    for name in ("configs", "recipes", "launch"):
        (d / name).symlink_to(REPO / name)
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, vocab_size=128)).save_pretrained(d / "small")
    (d / "corpus").mkdir()
    (d / "corpus" / "a.txt").write_text("\n\n".join(f"Line {i} of a small corpus, with some words in it." for i in range(3000)))
    return d


@pytest.mark.parametrize("where,cmd", COMMANDS, ids=[f"{w}: {c[:70]}" for w, c in COMMANDS])
def test_documented_command(where, cmd, workdir, monkeypatch):
    reason = skip_reason(cmd)
    if reason:
        pytest.skip(reason)
    same = _first_same(where, cmd)
    if same:
        pytest.skip(f"runs as {same}")
    monkeypatch.chdir(workdir)
    out_dir = f"runs/cmd{COMMANDS.index((where, cmd))}"
    argv = normalise(cmd, out_dir)
    if argv[:2] == ["progtrain", "verify"] and not Path(argv[3]).exists():
        assert run_in_process(["progtrain", "grow", argv[2], argv[3], "--hidden-size", "64", "--overwrite"])[0] == 0
    if argv[:2] == ["progtrain", "eval"] and not Path(argv[2]).exists():  # evaluates a run's output: train it
        config = argv[argv.index("--config") + 1]
        code, err = run_in_process(normalise(f"progtrain train {config}", str(Path(argv[2]).parent)))
        assert code == 0, err
    if argv[:2] == ["progtrain", "grow"]:
        argv.append("--overwrite")  # the README's grow examples reuse ./big
    code, err = run_in_process(argv)
    assert code == 0, f"{where}: `{cmd}` (ran {' '.join(argv)}) exited {code}:\n{err[-3000:]}"
