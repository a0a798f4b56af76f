"""`progtrain push` against a local Hub server (tests/hub_server.py): round trip, options, failures."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from hub_server import HubServer
from progtrain.card import parse_front_matter
from progtrain.cli import main
from progtrain.growth import grow
from progtrain.hub import HubError, files_to_push, push_to_hub
from progtrain.io import save_checkpoint
from tiny_models import tiny_model

TOKEN = "hf_" + "pUsHtEsT" * 5  # shaped like a real token, so redaction patterns see it too
REPO = "someone/tiny-grown"
IDS = torch.tensor([[1, 5, 9, 42, 7, 100, 3, 0], [60, 61, 62, 63, 2, 2, 2, 2]])


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=100, special_tokens=["<unk>", "<eos>"], show_progress=False)
    tok.train_from_iterator(["Progressive training grows a small model into a large one."] * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")


@pytest.fixture(scope="module")
def grown_dir(tmp_path_factory):
    """A grown tiny GPT-2 checkpoint with tokenizer, growth history, a metrics file, a plot and
    training state that must not be uploaded."""
    out = tmp_path_factory.mktemp("push") / "grown"
    r = grow(tiny_model("gpt2"), hidden_size=64, num_layers=3, verify=False)
    save_checkpoint(r.model, out, tokenizer=tiny_tokenizer(), history=[dict(r.record, source_path="./small")])
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 4.6}\n')
    (out / "plots").mkdir()
    (out / "plots" / "loss.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
    torch.save({"state": {}}, out / "optimizer.pt")
    (out / "checkpoint-10").mkdir()
    (out / "checkpoint-10" / "model.safetensors").write_bytes(b"not pushed")
    with torch.no_grad():
        logits = r.model(IDS).logits
    return out, logits


def error_lines(stderr: str) -> list[str]:
    """The error lines of the CLI's stderr (upload progress bars aside); there is no traceback."""
    assert "Traceback" not in stderr
    lines = [l for l in stderr.strip().splitlines() if l.strip()]
    assert lines and lines[-1].startswith("progtrain push: error: "), stderr
    return [l for l in lines if "error" in l.lower()]


def snapshot(path: Path) -> dict[str, str]:
    return {str(f.relative_to(path)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(path.rglob("*")) if f.is_file()}


@pytest.fixture
def hub(monkeypatch):
    """A running server with its token; huggingface_hub in this process pointed at it."""
    with HubServer(token=TOKEN) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)
        yield server


def subprocess_env(server: HubServer, tmp_path: Path, token: str = TOKEN) -> dict[str, str]:
    return dict(os.environ, HF_ENDPOINT=server.endpoint, HF_TOKEN=token, HF_HUB_OFFLINE="0",
                HF_HUB_DISABLE_XET="1", HF_HOME=str(tmp_path / "hf_home"), PYTHONPATH=os.pathsep.join(sys.path))


LOAD = """
import json, sys, torch, transformers as T
model = T.AutoModelForCausalLM.from_pretrained(sys.argv[1], revision=sys.argv[2])
tok = T.AutoTokenizer.from_pretrained(sys.argv[1], revision=sys.argv[2])
with torch.no_grad():
    logits = model(torch.tensor(json.loads(sys.argv[3]))).logits
torch.save(logits, sys.argv[4])
print(type(model).__name__, type(tok).__name__, tok("a small model")["input_ids"])
"""


def test_push_then_from_pretrained_gives_identical_logits(grown_dir, hub, tmp_path, capsys, caplog):
    out, logits = grown_dir
    before = snapshot(out)
    code = main(["-v", "push", str(out), REPO, "--commit-message", "stage 1"])
    cap = capsys.readouterr()
    assert code == 0, cap.err
    assert TOKEN not in cap.out + cap.err + caplog.text
    assert f"/{REPO}/commit/" in cap.out
    files = hub.list_files(REPO)
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "README.md",
            "progtrain_growth.json", "metrics.jsonl", "plots/loss.png", "generation_config.json"} <= set(files)
    assert "optimizer.pt" not in files and not any(f.startswith("checkpoint-10") for f in files)
    # the weights went through git-LFS (batch, PUT, verify), the small text files inline
    assert any(m == "PUT" and p_.startswith("/lfs-upload/") for m, p_ in hub.requests)
    assert hub.file(REPO, "model.safetensors") == (out / "model.safetensors").read_bytes()
    card = hub.file(REPO, "README.md").decode()
    assert TOKEN not in card
    meta = parse_front_matter(card)
    assert meta["library_name"] == "transformers" and "progressive-training" in meta["tags"]
    assert meta["pipeline_tag"] == "text-generation" and "base_model" not in meta  # local source
    assert "| 1 | growth 1 | 64 | 3 |" in card
    commits = hub.state.repos[REPO].commits
    assert [c["message"] for c in commits.values()] == ["initial commit", "stage 1"]

    # a fresh process that knows the Hub only through HF_ENDPOINT loads the pushed repo
    env = subprocess_env(hub, tmp_path)
    q = subprocess.run([sys.executable, "-c", LOAD, REPO, "main", json.dumps(IDS.tolist()), str(tmp_path / "l.pt")],
                       env=env, capture_output=True, text=True, timeout=120)
    assert q.returncode == 0, q.stderr
    name, _, ids = q.stdout.split(" ", 2)
    assert name == "GPT2LMHeadModel" and json.loads(ids) == tiny_tokenizer()("a small model")["input_ids"]
    assert any(p_.startswith(f"/{REPO}/resolve/") for _, p_ in hub.requests)
    remote = torch.load(tmp_path / "l.pt", weights_only=True)
    assert torch.equal(remote, logits)
    assert snapshot(out) == before  # no README.md or anything else written locally


def test_revision_pr_private_and_existing_card(grown_dir, hub, tmp_path):
    out, _ = grown_dir
    url = push_to_hub(out, REPO, private=True, revision="stage-1")
    repo = hub.state.repos[REPO]
    assert repo.private and f"/{REPO}/commit/" in url
    assert "model.safetensors" in hub.list_files(REPO, "stage-1")
    assert hub.list_files(REPO, "main") == [".gitattributes"]  # main untouched
    # a second push to main as a pull request, from a dir with its own README.md
    own = tmp_path / "own"
    save_checkpoint(tiny_model("gpt2"), own, extra_files={"README.md": "---\nlicense: mit\n---\n# mine\n"})
    url = push_to_hub(own, REPO, create_pr=True)
    assert url.endswith("/discussions/1")
    assert hub.file(REPO, "README.md", "refs/pr/1").decode().endswith("# mine\n")
    assert hub.list_files(REPO, "main") == [".gitattributes"]


def test_card_yaml_rejected_by_hub_is_one_line_error(grown_dir, hub, tmp_path, capsys):
    bad = tmp_path / "bad_card"
    save_checkpoint(tiny_model("gpt2"), bad, extra_files={"README.md": "---\npipeline_tag: [1, 2]\n---\n"})
    before = snapshot(bad)
    code = main(["push", str(bad), REPO])
    err = capsys.readouterr().err
    assert code == 2 and len(error_lines(err)) == 1
    assert "pipeline_tag" in err and TOKEN not in err
    assert snapshot(bad) == before and REPO not in hub.state.repos or hub.list_files(REPO) == [".gitattributes"]


@pytest.mark.parametrize(
    "pattern,status,words,exit_code",
    [  # the user's fault (a bad token) exits 2 like any bad input; the server's or network's exits 1
        (None, "wrong-token", "authentication refused (HTTP 401 on /api/repos/create)", 2),
        (r"^POST /api/repos/create", 500, "HTTP 500", 1),
        (r"^POST /api/models/.*/commit/", 500, "HTTP 500", 1),
        (r"^POST /api/models/.*/commit/", "drop", "check your connection", 1),
        (r"^POST /api/repos/create", "drop", "check your connection", 1),
    ],
)
def test_server_failures_give_one_line_and_keep_local_dir(grown_dir, hub, capsys, monkeypatch, pattern, status, words,
                                                          exit_code):
    out, _ = grown_dir
    before = snapshot(out)
    if status == "wrong-token":
        monkeypatch.setenv("HF_TOKEN", "hf_" + "WrOnG" * 8)
    else:
        hub.fail(pattern, status)
    code = main(["push", str(out), REPO])
    cap = capsys.readouterr()
    lines = error_lines(cap.err)
    assert code == exit_code and len(lines) == 1, cap.err
    assert words in lines[0]
    assert TOKEN not in cap.err + cap.out and "WrOnG" not in cap.err
    assert snapshot(out) == before
    assert REPO not in hub.state.repos or hub.list_files(REPO) == [".gitattributes"]  # nothing committed


def test_push_without_xet_or_lfs_server_commits_inline(grown_dir, tmp_path, monkeypatch):
    """With hf_xet active (the default client) and a server that answers 'regular' for every file."""
    out, _ = grown_dir
    with HubServer(token=TOKEN, lfs=False) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
        push_to_hub(out, REPO)
        assert server.file(REPO, "model.safetensors") == (out / "model.safetensors").read_bytes()
        assert not any(p.startswith("/lfs-upload/") for _, p in server.requests)


def _bad_dirs(root: Path, grown: Path) -> dict[str, tuple[Path, str]]:
    import shutil

    cases = {}
    d = root / "no_config"
    shutil.copytree(grown, d)
    (d / "config.json").unlink()
    cases["no_config"] = (d, "no config.json")
    d = root / "no_weights"
    d.mkdir()
    shutil.copy(grown / "config.json", d / "config.json")
    cases["no_weights"] = (d, "no *.safetensors")
    d = root / "truncated"
    shutil.copytree(grown, d)
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[:100])
    cases["truncated"] = (d, "not a readable safetensors file")
    d = root / "missing_shard"
    shutil.copytree(grown, d)
    (d / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"a": "model.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    cases["missing_shard"] = (d, "model-00002-of-00002.safetensors")
    d = root / ".grown.tmp-abc"
    shutil.copytree(grown, d)
    cases["temp_dir"] = (d, "temporary directory")
    cases["missing_dir"] = (root / "nope", "is not a directory")
    return cases


@pytest.mark.parametrize("case", ["no_config", "no_weights", "truncated", "missing_shard", "temp_dir", "missing_dir"])
def test_incomplete_checkpoint_refused_before_network(grown_dir, hub, tmp_path, capsys, case):
    out, _ = grown_dir
    d, words = _bad_dirs(tmp_path, out)[case]
    code = main(["push", str(d), REPO])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and words in err, err
    assert hub.requests == []


@pytest.mark.parametrize(
    "repo,env,words",
    [
        ("no-owner", {}, "has no owner"),
        ("a/b/c", {}, "invalid repo id"),
        ("someone/bad name", {}, "invalid repo id"),
        (REPO, {"HF_TOKEN": None}, "no Hugging Face token"),
        (REPO, {"offline": True}, "HF_HUB_OFFLINE"),
    ],
)
def test_bad_input_refused_before_network(grown_dir, hub, monkeypatch, tmp_path, repo, env, words):
    out, _ = grown_dir
    if "HF_TOKEN" in env:
        monkeypatch.delenv("HF_TOKEN")
        monkeypatch.setenv("HF_HOME", str(tmp_path))  # no saved login either
        monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "token"))
        monkeypatch.setattr(huggingface_hub.constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "stored_tokens"))
    if env.get("offline"):
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(HubError, match=words):
        push_to_hub(out, repo)
    assert hub.requests == []


def test_file_containing_token_is_refused(grown_dir, hub, tmp_path):
    import shutil

    d = tmp_path / "leaky"
    shutil.copytree(grown_dir[0], d)
    (d / "run_config.yaml").write_text(f"push_to_hub: {{token: {TOKEN}}}\n")
    with pytest.raises(HubError, match="run_config.yaml contains your Hugging Face token") as e:
        push_to_hub(d, REPO)
    assert TOKEN not in str(e.value) and hub.requests == []


def test_files_to_push_selection(grown_dir):
    files = files_to_push(grown_dir[0])
    assert "model.safetensors" in files and "plots/loss.png" in files and "metrics.jsonl" in files
    assert "optimizer.pt" not in files and "checkpoint-10/model.safetensors" not in files


def test_push_help_shows_commands(capsys):
    with pytest.raises(SystemExit) as e:
        main(["push", "--help"])
    text = capsys.readouterr().out
    assert e.value.code == 0
    for flag in ("OUT_DIR", "REPO_ID", "--private", "--revision", "--commit-message", "--create-pr", "HF_TOKEN"):
        assert flag in text
