"""Publish a checkpoint directory to the Hugging Face Hub: ``progtrain push OUT_DIR REPO_ID``.

:func:`push_to_hub` uploads the standard checkpoint (``config.json``, safetensors weights,
``generation_config.json``), the tokenizer, the model card (``README.md``; rendered from
``progtrain_growth.json`` with :mod:`progtrain.card` when the directory has none, without writing it
to the directory) and the metrics/plot files, in ONE commit made with ``huggingface_hub``. Training
state (optimizer/scheduler/RNG files, ``checkpoint-*`` sub-directories), pickle files and hidden or
temporary files are never uploaded.

The token comes from the ``token`` argument, ``HF_TOKEN`` or ``hf auth login``; it is never printed,
logged or written to the card. Every failure (bad directory, no token, HTTP 401/403/404/5xx,
dropped connection) raises a one-line :class:`~progtrain.errors.HubError` and leaves the local
directory untouched: :class:`~progtrain.errors.HubInputError` (exit 2) when the user can fix it (the
directory, the repo id, the token, HTTP 401/403/404, a card the Hub rejects), a plain ``HubError``
(exit 1) when the network or the server failed (dropped connection, HTTP 5xx).
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import logging
import os
from pathlib import Path
from typing import Any

from .errors import HubError, HubInputError

logger = logging.getLogger(__name__)

# Uploaded: the checkpoint, tokenizer, card, growth history, run config, metrics and plots, and the
# files carried from a grown model's source (custom code named in auto_map, chat templates).
INCLUDE = (
    "*.json", "*.safetensors", "tokenizer*", "vocab.*", "merges.txt", "*.model", "chat_template.*", "*.jinja",
    "*.tiktoken", "*.py",
    "*.md", "*.yaml", "*.yml", "*.csv", "*.jsonl", "*.tsv", "*.txt", "*.png", "*.svg", "*.pdf",
)
# Never uploaded, even when INCLUDE matches: training state, pickles, hidden and temporary files.
EXCLUDE = (
    ".*", "*.bin", "*.pt", "*.pth", "*.pkl", "*.pickle", "*.ckpt", "*.h5", "*.msgpack",
    "optimizer*", "scheduler*", "rng_state*", "*.tmp", "*~",
)
EXCLUDE_DIRS = ("checkpoint-*", "checkpoints", "ckpt*", "runs", "wandb", "tensorboard", "logs", "__pycache__")


# ---------------------------------------------------------------------- selection + checks
def files_to_push(out_dir: str | os.PathLike) -> list[str]:
    """Paths (relative, POSIX) under ``out_dir`` that :func:`push_to_hub` uploads, sorted.

    Top-level files matching :data:`INCLUDE` and not :data:`EXCLUDE`, plus files one level down in
    directories such as ``plots/`` or ``metrics/`` (not training-state directories)."""
    root = Path(out_dir)
    out: list[str] = []
    for f in sorted(root.rglob("*")):
        if not f.is_file():
            continue
        rel = f.relative_to(root)
        parts = rel.parts
        if len(parts) > 2 or any(p.startswith(".") for p in parts):
            continue
        if len(parts) == 2 and any(fnmatch.fnmatch(parts[0], d) for d in EXCLUDE_DIRS):
            continue
        name = parts[-1]
        if any(fnmatch.fnmatch(name, p) for p in EXCLUDE):
            continue
        if any(fnmatch.fnmatch(name, p) for p in INCLUDE):
            out.append(rel.as_posix())
    return out


def check_checkpoint_dir(out_dir: str | os.PathLike) -> None:
    """Refuse a directory that is not a complete, safe HF checkpoint (before any network access).

    Checks: it exists and is not an atomic-write temp dir; ``config.json`` parses; weights exist as
    safetensors (pickle-only weights are refused with the conversion command, see
    :func:`progtrain.io.check_safe_weights`); every shard of a sharded index is present; each
    safetensors header is readable."""
    from safetensors import safe_open

    from .io import check_safe_weights

    p = Path(out_dir)
    if not p.is_dir():
        raise HubInputError(f"{p} is not a directory: pass the output directory of `progtrain grow` or `progtrain train`")
    if p.name.startswith(".") and (".tmp-" in p.name or ".old-" in p.name):
        raise HubInputError(f"{p} is a temporary directory of an unfinished save: push the final directory instead")
    check_safe_weights(p)
    cfg = p / "config.json"
    if not cfg.is_file():
        raise HubInputError(f"{p} has no config.json, so it is not a complete Hugging Face checkpoint: "
                       f"save it with model.save_pretrained() or progtrain.io.save_checkpoint()")
    try:
        config = json.loads(cfg.read_text())
    except (OSError, ValueError) as e:
        raise HubInputError(f"{cfg} is not valid JSON ({type(e).__name__}): re-save the checkpoint") from None
    if not isinstance(config, dict) or "model_type" not in config:
        raise HubInputError(f"{cfg} has no model_type: re-save the checkpoint with save_pretrained()")
    shards = sorted(f.name for f in p.glob("*.safetensors"))
    index = p / "model.safetensors.index.json"
    if index.exists():
        try:
            wanted = set(json.loads(index.read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError):
            raise HubInputError(f"{index} is not a valid safetensors index: re-save the checkpoint") from None
        missing = sorted(wanted - set(shards))
        if missing:
            raise HubInputError(f"{p} is incomplete: shard(s) {', '.join(missing)} listed in {index.name} are missing; "
                           f"re-save the checkpoint")
    if not shards:
        raise HubInputError(f"{p} has no *.safetensors weights: save the model with save_pretrained() (safetensors by default)")
    for name in shards:
        try:
            with safe_open(str(p / name), framework="pt") as f:
                f.keys()
        except Exception as e:  # truncated or corrupt file: safetensors raises its own error types
            raise HubInputError(f"{p / name} is not a readable safetensors file ({type(e).__name__}): "
                           f"the save was interrupted or the file is corrupt; re-save the checkpoint") from None


def _model_card(root: Path) -> str:
    """The README.md text for a directory without one, rendered from its config and growth history."""
    from .card import render_model_card
    from .io import read_growth_history

    config = json.loads((root / "config.json").read_text())
    history = read_growth_history(root)
    base = history[0].get("source_path") if history else None
    return render_model_card(config=config, growth_history=history, base_model=base)


def _token(token: str | None) -> str:
    from huggingface_hub import get_token

    tok = token or get_token()
    if not tok:
        raise HubInputError("no Hugging Face token found: set HF_TOKEN to a token with write access or run `hf auth login`")
    return tok


def _scan_for_token(root: Path, files: list[str], token: str) -> None:
    """Refuse to upload a text file that contains the token (e.g. a config that captured it)."""
    for rel in files:
        f = root / rel
        if f.suffix in (".safetensors", ".png", ".pdf") or f.stat().st_size > 16 * 1024 * 1024:
            continue
        if token.encode() in f.read_bytes():
            raise HubInputError(f"{rel} contains your Hugging Face token: remove it from the file before pushing")


def _one_line(e: BaseException, token: str | None) -> str:
    from .card import redact

    text = " ".join(str(e).split()) or type(e).__name__
    if token:
        text = text.replace(token, "[redacted]")
    return redact(text)[:300]


def _http_error(e: Exception, repo_id: str, endpoint: str, token: str | None) -> HubError:
    """A one-line :class:`HubError` for an exception raised by huggingface_hub/httpx2."""
    resp = getattr(e, "response", None)
    status = getattr(resp, "status_code", None)
    where = f"push of {repo_id} to {endpoint} failed"
    if status is None:
        return HubError(f"{where}: {type(e).__name__}: {_one_line(e, token)}; check your connection and "
                        f"HF_ENDPOINT, then retry")
    try:
        path = resp.request.url.path
    except Exception:  # a response without its request: name no path
        path = "?"
    said = getattr(e, "server_message", None) or ""
    said = f" ({_one_line(ValueError(said), token)})" if said.strip() else ""
    if status in (401, 403):
        return HubInputError(f"{where}: authentication refused (HTTP {status} on {path}){said}; set HF_TOKEN to a token "
                        f"with write access to {repo_id.split('/')[0]} or run `hf auth login`")
    if status == 404:
        return HubInputError(f"{where}: not found (HTTP 404 on {path}){said}; check REPO_ID and --revision")
    if status < 500:  # the Hub refused the request as sent (e.g. a model card it cannot parse)
        return HubInputError(f"{where}: the Hub refused it (HTTP {status} on {path}){said}; fix the request and retry")
    return HubError(f"{where}: the Hub answered HTTP {status} on {path}{said}; the push did not complete, "
                    f"retry later")


# ---------------------------------------------------------------------- push
def push_to_hub(
    out_dir: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    token: str | None = None,
    create_pr: bool = False,
) -> str:
    """Upload a checkpoint directory to the Hub in one commit and return the commit (or PR) URL.

    Args:
        out_dir: a complete checkpoint directory (``progtrain grow``/``train`` output).
        repo_id: ``owner/name`` of the model repo; created (with ``private``) when missing.
        private: create the repo private (an existing repo keeps its visibility).
        revision: branch to commit to (created from ``main`` when missing); default ``main``.
        commit_message: default ``"Upload progressively grown model with progtrain"``.
        token: Hub token; default ``HF_TOKEN`` or the token saved by ``hf auth login``.
        create_pr: open a pull request instead of committing to the branch.

    The endpoint is ``HF_ENDPOINT`` (read at call time). Raises :class:`HubError` (one line, local
    directory untouched) on any failure.
    """
    from huggingface_hub import CommitOperationAdd, HfApi, constants
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    root = Path(out_dir)
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise HubInputError(f"invalid repo id {repo_id!r}: use 'owner/name' with letters, digits, '-', '_' or '.'") from None
    if "/" not in repo_id:
        raise HubInputError(f"repo id {repo_id!r} has no owner: use 'your-username/{repo_id}' or 'your-org/{repo_id}'")
    if revision is not None and (not revision.strip() or revision.startswith("refs/pr/")):
        raise HubInputError(f"invalid --revision {revision!r}: name a branch (use --create-pr to open a pull request)")
    check_checkpoint_dir(root)
    if constants.is_offline_mode():
        raise HubInputError("offline mode is on (HF_HUB_OFFLINE=1): unset HF_HUB_OFFLINE to push")
    tok = _token(token)
    files = files_to_push(root)
    _scan_for_token(root, files, tok)
    operations = [CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(root / rel)) for rel in files]
    if "README.md" not in files:
        operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=_model_card(root).encode()))

    endpoint = (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")
    api = HfApi(endpoint=endpoint, token=tok)
    message = commit_message or "Upload progressively grown model with progtrain"
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError

    network_errors = (HfHubHTTPError, httpx2.HTTPError, OSError)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision is not None and revision != "main":
            api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
        info = api.create_commit(
            repo_id,
            operations=operations,
            commit_message=message,
            revision=revision,
            create_pr=create_pr,
            repo_type="model",
        )
    except network_errors as e:
        raise _http_error(e, repo_id, endpoint, tok) from None
    except ValueError as e:  # malformed server answers and card validation errors
        raise HubInputError(f"push of {repo_id} to {endpoint} failed: {_one_line(e, tok)}") from None
    url = str(info.pr_url or info.commit_url)
    logger.info("pushed %d files from %s to %s", len(operations), root, url)
    return url


# ---------------------------------------------------------------------- CLI
def cmd_push(args: argparse.Namespace) -> int:
    """``progtrain push``: print what was uploaded and the commit URL; return 0."""
    url = push_to_hub(
        args.out_dir,
        args.repo_id,
        private=args.private,
        revision=args.revision,
        commit_message=args.commit_message,
        create_pr=args.create_pr,
    )
    files = files_to_push(args.out_dir)
    extra = "" if "README.md" in files else " + generated README.md"
    print(f"pushed {len(files)} files{extra} from {args.out_dir} to {args.repo_id}")
    print(url)
    return 0


def register(subparsers: Any) -> None:
    """Add the ``push`` sub-command to the ``progtrain`` CLI."""
    p = subparsers.add_parser(
        "push",
        help="upload a checkpoint directory (weights, tokenizer, model card, metrics) to the Hugging Face Hub",
        description="Upload OUT_DIR to the model repo REPO_ID in one commit: config.json, safetensors weights, "
        "tokenizer, README.md (a model card with the growth-history table is generated from "
        "progtrain_growth.json when OUT_DIR has none), progtrain_growth.json and metrics/plot files. "
        "Training state, pickle files and hidden files are not uploaded. The token comes from HF_TOKEN or "
        "`hf auth login` and is never printed; HF_ENDPOINT selects the Hub. Examples:\n"
        "  HF_TOKEN=hf_... progtrain push ./big your-name/gpt2-grown\n"
        "  progtrain push ./big your-name/gpt2-grown --private --revision stage-2 --commit-message 'stage 2'\n"
        "  progtrain push ./big your-org/gpt2-grown --create-pr",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("out_dir", metavar="OUT_DIR", help="checkpoint directory to upload")
    p.add_argument("repo_id", metavar="REPO_ID", help="model repo, owner/name (created when missing)")
    p.add_argument("--private", action="store_true", help="create the repo private (when it does not exist yet)")
    p.add_argument("--revision", metavar="BRANCH", help="branch to commit to (created from main when missing)")
    p.add_argument("--commit-message", help="commit message (default: 'Upload progressively grown model with progtrain')")
    p.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing directly")
    p.set_defaults(func=cmd_push)
