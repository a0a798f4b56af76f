"""Model cards for progressively trained / grown checkpoints.

:func:`render_model_card` writes the ``README.md`` of a checkpoint: YAML front matter in the form the
Hugging Face Hub validates (built with :class:`huggingface_hub.ModelCardData`) followed by a markdown
growth-history table (stage, sizes, parameters, steps, tokens, FLOPs, init strategy, validation
loss). :func:`parse_front_matter` reads the front matter back.

Cards never carry credentials: any Hugging Face token (the ``HF_TOKEN`` value or anything shaped like
``hf_...``) and any value under a key such as ``token``/``password``/``secret`` is redacted.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml
from huggingface_hub import ModelCardData

from .errors import ProgtrainConfigError

TAGS = ("progressive-training", "model-growth", "progtrain")
SIZE_KEYS = ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size")
SIZE_HEADERS = ("hidden", "layers", "heads", "kv heads", "FFN")
REDACTED = "[redacted]"

_TOKEN_RE = re.compile(r"\bhf_[A-Za-z0-9]{16,}\b")
# keys whose values are credentials ("hub_token", "password", ...), not counts such as "tokens"
_SECRET_KEY_RE = re.compile(r"(?:^|[_-])(token|password|passwd|secret|api[_-]?key|authorization)$", re.IGNORECASE)
# Hub ids as the Hub accepts them in ``base_model`` / ``datasets``: "name" or "owner/name"
_REPO_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}(/[A-Za-z0-9][A-Za-z0-9._-]{0,95})?$")


# ---------------------------------------------------------------------- pipeline tag
def pipeline_tag_for(config: Any) -> str | None:
    """The Hub ``pipeline_tag`` of a config's architecture (``config.architectures[0]``), looked up in
    transformers' auto-model task mappings: causal LM -> text-generation, masked LM -> fill-mask,
    base model -> feature-extraction, ... None when the class is in no mapping."""
    from transformers.models.auto import modeling_auto as ma

    archs = _get(config, "architectures") or []
    if not archs:
        return None
    arch = archs[0]
    table = (
        ("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "text-generation"),
        ("MODEL_FOR_MASKED_LM_MAPPING_NAMES", "fill-mask"),
        ("MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES", "text-classification"),
        ("MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES", "token-classification"),
        ("MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES", "question-answering"),
        ("MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES", "text2text-generation"),
        ("MODEL_MAPPING_NAMES", "feature-extraction"),
    )
    for mapping_name, tag in table:
        mapping = getattr(ma, mapping_name, {})
        for value in mapping.values():
            names = value if isinstance(value, (tuple, list)) else (value,)
            if arch in names:
                return tag
    return None


AUTO_CLASS_FOR_TAG = {
    "text-generation": "AutoModelForCausalLM",
    "fill-mask": "AutoModelForMaskedLM",
    "text-classification": "AutoModelForSequenceClassification",
    "token-classification": "AutoModelForTokenClassification",
    "question-answering": "AutoModelForQuestionAnswering",
    "text2text-generation": "AutoModelForSeq2SeqLM",
    "feature-extraction": "AutoModel",
}


def loader_class_for(config: Any) -> str:
    """The transformers class name that loads a checkpoint of ``config`` with all its weights: the
    Auto class of its pipeline tag, else ``architectures[0]`` itself, else ``AutoModel`` (a config
    naming no architecture has no known head)."""
    import transformers

    auto = AUTO_CLASS_FOR_TAG.get(pipeline_tag_for(config) or "")
    if auto:
        return auto
    archs = _get(config, "architectures") or []
    if archs and isinstance(archs[0], str) and hasattr(transformers, archs[0]):
        return archs[0]
    return "AutoModel"


# ---------------------------------------------------------------------- public API
def render_model_card(
    *,
    config: Any,
    growth_history: list[dict],
    stages: list[dict] | None = None,
    final_metrics: dict | None = None,
    base_model: str | None = None,
    datasets: list[str] | None = None,
    model_name: str | None = None,
    extra_markdown: str | None = None,
    license_info: dict | None = None,
) -> str:
    """Render the ``README.md`` text of a checkpoint.

    Args:
        config: the final model's ``PretrainedConfig`` (or its ``to_dict()``).
        growth_history: growth records (``GrowthResult.record``, as in ``progtrain_growth.json``).
        stages: one row per training stage: ``{"stage", "name", "sizes": {hidden_size, num_layers,
            num_heads, num_kv_heads, intermediate_size}, "params", "steps", "tokens", "flops", "init",
            "val_loss"}``; when None the table is built from ``growth_history`` (stage 0 = the source
            of the first growth, stage i = the target of growth i; steps/tokens/FLOPs/loss are taken
            from a record when it has them, else shown as "-"). Given: the card says the model was trained
            progressively; None: that it was grown and not trained since its last growth.
        final_metrics: metric name -> value of the final model (shown in a table).
        base_model: Hub id of the checkpoint this model was grown from (front matter ``base_model``;
            a local path is mentioned in the text only, because the Hub accepts only repo ids there).
        datasets: Hub dataset ids the model was trained on (front matter ``datasets``; other names
            appear in the text only).
        model_name: title of the card and repo id used in the usage snippet.
        extra_markdown: appended at the end.
        license_info: the source card's ``license`` (and ``license_name``/``license_link`` for
            ``other``) front-matter fields, kept in this card (see :func:`license_of`).

    Returns:
        The card text: ``---\\n<yaml>\\n---\\n\\n<markdown>``. Tokens and secrets are redacted.
    """
    growth_history, stages, final_metrics = _checked_inputs(growth_history, stages, final_metrics)
    model_type = _get(config, "model_type")
    hub_base = base_model if base_model and _is_repo_id(base_model) else None
    hub_datasets = [d for d in (datasets or []) if _is_repo_id(d)]
    front = _front_matter(config, hub_base, hub_datasets, license_info)

    title = model_name or (f"progressively grown {model_type}" if model_type else "progressively grown model")
    rows = stages if stages is not None else _rows_from_history(growth_history)
    md: list[str] = [f"# {title}", ""]
    if stages is not None:  # a training run's card: its stage rows say what was trained
        md.append(
            "This model was trained progressively with progtrain: "
            "it was grown during (pre)training, each growth function-preserving where the architecture allows, "
            "and saved as a standard `transformers` checkpoint (safetensors)."
        )
    else:  # `progtrain grow` / push of a grown checkpoint: no training after the last growth
        md.append(
            "This model was grown with progtrain from a smaller checkpoint and has not been trained since its "
            "last growth: the new parameters hold their initial values (function-preserving where the "
            "architecture allows, see the deviation below). It is saved as a standard `transformers` checkpoint "
            "(safetensors); train it before use."
        )
    md.append("")
    md += _summary(config, base_model, hub_base, datasets, hub_datasets)
    md += ["## Growth history", "", _history_table(rows), ""]
    details = _growth_details(growth_history)
    if details:
        md += ["### Growth steps", "", *details, ""]
    if final_metrics:
        md += ["## Final metrics", "", "| metric | value |", "| --- | --- |"]
        md += [f"| {_cell(k)} | {_fmt_float(v)} |" for k, v in final_metrics.items()]
        md.append("")
    md += _usage(config, model_name)
    if extra_markdown:
        md += [extra_markdown.rstrip(), ""]
    text = f"---\n{front.rstrip()}\n---\n\n" + "\n".join(md).rstrip() + "\n"
    return redact(text)


def _checked_inputs(growth_history: Any, stages: Any, final_metrics: dict | None
                    ) -> tuple[list[dict], list[dict] | None, dict | None]:
    """:func:`render_model_card`'s record inputs checked (ProgtrainConfigError) and scrubbed of secrets."""
    if not isinstance(growth_history, (list, tuple)):
        raise ProgtrainConfigError(
            f"growth_history must be a list of growth records, got {type(growth_history).__name__}; "
            f"pass progtrain.io.read_growth_history(checkpoint_dir)"
        )
    if stages is not None and not isinstance(stages, (list, tuple)):
        raise ProgtrainConfigError(f"stages must be a list of stage rows or None, got {type(stages).__name__}")
    return ([_scrub(r) for r in growth_history], [_scrub(s) for s in stages] if stages is not None else None,
            _scrub(dict(final_metrics)) if final_metrics else None)


def _front_matter(config: Any, hub_base: str | None, hub_datasets: list[str], license_info: dict | None) -> str:
    """The card's YAML front matter (huggingface_hub's ``ModelCardData``): library, tags, Hub base
    model and datasets, pipeline tag, the source's license fields."""
    model_type = _get(config, "model_type")
    data = ModelCardData(
        library_name="transformers",
        tags=list(TAGS) + ([str(model_type)] if model_type else []),
        base_model=hub_base,
        datasets=hub_datasets or None,
        pipeline_tag=pipeline_tag_for(config),
        **{k: v for k, v in (license_info or {}).items() if k in LICENSE_FIELDS and v},
    )
    return data.to_yaml()


LICENSE_FIELDS = ("license", "license_name", "license_link")


def license_of(card_path: str | os.PathLike) -> dict:
    """The license fields (:data:`LICENSE_FIELDS`) of a model card's front matter; {} when the file
    is missing or its front matter is unreadable (the new card then simply has no license)."""
    try:
        meta = parse_front_matter(Path(card_path).read_text())
    except (OSError, UnicodeDecodeError, ProgtrainConfigError):
        return {}
    return {k: meta[k] for k in LICENSE_FIELDS if isinstance(meta.get(k), (str, list)) and meta[k]}


def parse_front_matter(text: str) -> dict:
    """The YAML front matter of a model card as a dict ({} when the card has none).

    Raises:
        ProgtrainConfigError: the front matter is not closed, not valid YAML or not a mapping.
    """
    lines = text.lstrip("\ufeff").splitlines()
    if not lines or lines[0].strip() != "---":
        return {}
    try:
        end = next(i for i in range(1, len(lines)) if lines[i].strip() == "---")
    except StopIteration:
        raise ProgtrainConfigError(
            "model card front matter starts with '---' but is never closed: add a line '---' after the YAML block"
        ) from None
    try:
        data = yaml.safe_load("\n".join(lines[1:end]))
    except yaml.YAMLError as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ProgtrainConfigError(f"model card front matter is not valid YAML ({first}): fix the YAML block") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ProgtrainConfigError(
            f"model card front matter must be a YAML mapping, got {type(data).__name__}: use 'key: value' lines"
        )
    return data


def redact(text: str) -> str:
    """``text`` with Hugging Face tokens (the ``HF_TOKEN``/``HUGGING_FACE_HUB_TOKEN`` values and any
    ``hf_...`` token) replaced by ``[redacted]``."""
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        val = os.environ.get(var)
        if val and len(val) >= 8:
            text = text.replace(val, REDACTED)
    return _TOKEN_RE.sub(REDACTED, text)


# ---------------------------------------------------------------------- helpers
def _get(config: Any, key: str, default: Any = None) -> Any:
    if isinstance(config, Mapping):
        return config.get(key, default)
    return getattr(config, key, default)


def _is_repo_id(name: str) -> bool:
    if not isinstance(name, str) or not _REPO_ID_RE.match(name) or ".." in name:
        return False
    return not Path(name).exists()  # a local directory is not a Hub id


def _scrub(obj: Any) -> Any:
    """Drop values under secret-looking keys and redact token strings, recursively."""
    if isinstance(obj, Mapping):
        return {k: (REDACTED if _SECRET_KEY_RE.search(str(k)) else _scrub(v)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_scrub(v) for v in obj]
    if isinstance(obj, str):
        return redact(obj)
    return obj


def _rows_from_history(history: Sequence[dict]) -> list[dict]:
    """Stage rows (the ``stages`` format) derived from growth records."""
    if not history:
        return []
    first = history[0]
    rows = [
        {
            "stage": 0,
            "name": "initial",
            "sizes": first.get("source", {}),
            "params": first.get("params_before"),
            "init": "-",
        }
    ]
    for i, rec in enumerate(history, start=1):
        init = rec.get("init")
        rows.append(
            {
                "stage": i,
                "name": rec.get("name") or rec.get("stage_name") or f"growth {i}",
                "sizes": rec.get("target", {}),
                "params": rec.get("params_after"),
                "steps": rec.get("steps", rec.get("step")),
                "tokens": rec.get("tokens"),
                "flops": rec.get("flops"),
                "init": init.get("name") if isinstance(init, Mapping) else init,
                "val_loss": rec.get("val_loss"),
            }
        )
    return rows


def _history_table(rows: Sequence[dict]) -> str:
    headers = ("stage", "name", *SIZE_HEADERS, "params", "steps", "tokens", "FLOPs", "init", "val loss")
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
    if not rows:
        out.append("| " + " | ".join(["-"] * len(headers)) + " |")
        return "\n".join(out)
    for r in rows:
        sizes = r.get("sizes") or {}
        cells = [
            _fmt_int(r.get("stage")),
            _cell(r.get("name")),
            *(_fmt_int(sizes.get(k)) for k in SIZE_KEYS),
            _fmt_int(r.get("params")),
            _fmt_int(r.get("steps")),
            _fmt_int(r.get("tokens")),
            _fmt_sci(r.get("flops")),
            _cell(r.get("init")),
            _fmt_float(r.get("val_loss")),
        ]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def _growth_details(history: Sequence[dict]) -> list[str]:
    lines = []
    for i, rec in enumerate(history, start=1):
        init = rec.get("init")
        init_name = init.get("name") if isinstance(init, Mapping) else init
        dev = rec.get("deviation") or {}
        parts = [f"{i}. `{_cell(rec.get('model_class') or rec.get('family') or '?')}`"]
        src, tgt = rec.get("source") or {}, rec.get("target") or {}
        changed = [f"{k} {src.get(k)} -> {tgt.get(k)}" for k in SIZE_KEYS if src.get(k) != tgt.get(k)]
        parts.append(", ".join(changed) if changed else "no size change")
        if init_name:
            parts.append(f"init `{_cell(init_name)}`")
        # the label is the recorded measurement against its tolerance, never the construction's promise
        # (records written before tolerances were recorded were measured at the fp32 default)
        rel, tol = dev.get("rel"), dev.get("tolerance")
        notes = "; ".join(_cell(str(n)) for n in rec.get("notes") or [])
        if isinstance(rel, (int, float)) and not isinstance(rel, bool):
            from .verify import tolerance_for

            tol = float(tol) if isinstance(tol, (int, float)) else tolerance_for()
            if rel <= tol:
                parts.append(f"exact, function-preserving (relative deviation <= {tol:g})")
            else:
                parts.append(f"approximate (relative deviation > {tol:g})" + (": " + notes if notes else ""))
        elif notes:
            parts.append("not measured, approximate by construction: " + notes)
        else:
            parts.append("exactness not measured")
        if dev.get("max_abs") is not None:
            parts.append(f"max |delta {dev.get('kind', 'logits')}| = {_fmt_sci(dev.get('max_abs'))}")
        if dev.get("rel") is not None:
            parts.append(f"relative {_fmt_sci(dev.get('rel'))}")
        lines.append(": ".join(parts[:2]) + ("; " + "; ".join(parts[2:]) if parts[2:] else ""))
    return lines


def _summary(config: Any, base_model: str | None, hub_base: str | None, datasets: list[str] | None,
             hub_datasets: list[str]) -> list[str]:
    archs = _get(config, "architectures") or []
    lines = ["## Model", ""]
    if archs:
        lines.append(f"- architecture: `{_cell(archs[0])}`")
    if base_model:
        local = f"a local checkpoint (`{_cell(Path(str(base_model)).name)}`)"
        where = f"[{hub_base}](https://huggingface.co/{hub_base})" if hub_base else local
        lines.append(f"- grown from: {where}")
    if datasets:
        names = [d if d in hub_datasets else Path(str(d)).name for d in datasets]
        lines.append("- trained on: " + ", ".join(f"`{_cell(d)}`" for d in names))
    lines.append("")
    return lines


def _usage(config: Any, model_name: str | None) -> list[str]:
    auto = loader_class_for(config)
    repo = model_name if model_name and _REPO_ID_RE.match(model_name) else "path/to/this/model"
    return [
        "## Usage",
        "",
        "```python",
        f"from transformers import {auto}",
        "",
        f'model = {auto}.from_pretrained("{repo}")',
        "```",
        "",
        "The growth records (sizes, init strategy, measured deviation) are in `progtrain_growth.json`.",
        "",
    ]


def _cell(v: Any) -> str:
    """A value as a markdown table cell (pipes and newlines escaped)."""
    if v is None or v == "":
        return "-"
    return str(v).replace("|", "\\|").replace("\n", " ")


def _fmt_int(v: Any) -> str:
    if v is None or isinstance(v, bool):
        return "-"
    try:
        f = float(v)
    except (TypeError, ValueError):
        return _cell(v)
    if not math.isfinite(f):
        return str(f)
    return f"{int(f):,}" if f == int(f) else f"{f:,.2f}"


def _fmt_sci(v: Any) -> str:
    if v is None or isinstance(v, bool):
        return "-"
    try:
        return f"{float(v):.3g}"
    except (TypeError, ValueError):
        return _cell(v)


def _fmt_float(v: Any) -> str:
    if v is None or isinstance(v, bool):
        return "-"
    if isinstance(v, int):
        return f"{v:,}"
    try:
        f = float(v)
    except (TypeError, ValueError):
        return _cell(v)
    if math.isfinite(f) and abs(f) >= 1e6:
        return f"{f:.4g}"  # FLOPs: 3.909e+11, not 390919618560.0000
    return f"{f:.4f}" if math.isfinite(f) and abs(f) >= 1e-3 else f"{f:.4g}"
