"""``progtrain`` command line: grow | verify | train | plan | push.

Bad input exits with code 2 and one line on stderr; ``verify`` exits 1 when outputs differ by more
than the tolerance.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import yaml

from .errors import ProgtrainConfigError

logger = logging.getLogger("progtrain")

DEFAULT_SENTENCES = [
    "Progressive training grows a small model into a large one.",
    "The quick brown fox jumps over the lazy dog.",
    "Shall I compare thee to a summer's day? Thou art more lovely and more temperate.",
    "Function-preserving growth keeps the logits of the model unchanged.",
]


def _placement(value: str) -> str | list[int]:
    if value in ("interleave", "top"):
        return value
    try:
        return [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid placement {value!r}: use interleave, top or comma-separated layer indices like 2,5"
        ) from None


def _kv(value: str) -> tuple[str, Any]:
    if "=" not in value:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {value!r}")
    k, v = value.split("=", 1)
    return k.strip(), yaml.safe_load(v)


def _table(rows: Sequence[Sequence[Any]]) -> str:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for j, r in enumerate(rows):
        lines.append("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


# ---------------------------------------------------------------------- grow
def cmd_grow(args: argparse.Namespace) -> int:
    from .grow import GrowthSpec, grow
    from .io import load_model, load_tokenizer, read_growth_history, save_checkpoint

    spec = GrowthSpec(
        hidden_size=args.hidden_size,
        num_heads=args.num_heads,
        num_kv_heads=args.num_kv_heads,
        intermediate_size=args.intermediate_size,
        num_layers=args.num_layers,
        layer_placement=args.layer_placement,
        symmetry_noise=args.symmetry_noise,
    )
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise ProgtrainConfigError(f"output directory {out} exists and is not empty: pass --overwrite or another path")
    # validate sizes and the strategy against the config before loading any weights
    from transformers import AutoConfig

    from .arch import get_adapter
    from .init import get_strategy
    from .io import check_safe_weights

    check_safe_weights(args.src)
    try:
        config = AutoConfig.from_pretrained(args.src)
    except OSError as e:
        raise ProgtrainConfigError(f"cannot load a model config from {args.src!r}: {str(e).splitlines()[0]}") from None
    adapter = get_adapter(config)
    spec.resolve(adapter.read_sizes(config), adapter)
    strategy = get_strategy(args.init, **dict(args.init_option or []))
    model = load_model(args.src, task=args.task)  # in the dtype it was saved in
    tokenizer = load_tokenizer(args.src)
    data = None
    if strategy.needs_data:
        from .grow.calibration import calibration_batches

        data = calibration_batches(model, tokenizer, args.data, n_batches=args.calib_batches, seed=args.seed)
    model.eval()
    res = grow(model, spec, init=strategy, seed=args.seed, data=data, dtype=args.dtype)
    history = read_growth_history(args.src) + [dict(res.record, source_path=str(args.src))]
    from .card import render_model_card

    card = render_model_card(config=res.model.config, growth_history=history, base_model=str(args.src))
    save_checkpoint(
        res.model, out, tokenizer=tokenizer, history=history, extra_files={"README.md": card}, overwrite=args.overwrite
    )

    s, t = res.source_sizes.as_dict(), res.target_sizes.as_dict()
    rows = [("size", "before", "after")] + [(k, s[k], t[k]) for k in s]
    rows.append(("parameters", f"{res.record['params_before']:,}", f"{res.record['params_after']:,}"))
    print(_table(rows))
    dev = res.deviation
    status = "exact" if res.exact else "APPROXIMATE (" + "; ".join(res.notes) + ")"
    print(
        f"\nmax |delta {dev['kind']}| = {dev['max_abs']:.3e}  ({dev['rel']:.3e} of max |{dev['kind']}| "
        f"= {dev['max_ref']:.3g}) on {dev['batch']}x{dev['seq_len']} random tokens: {status}"
    )
    d_src, d_out = dev["dtypes"]
    print(f"dtype: {d_src} -> {d_out}   tolerance: {dev['tolerance']:.3g} relative (weights as stored, "
          f"outputs computed in float32)")
    print(f"init: {strategy.name}   seed: {args.seed}   time: {res.record['seconds']:.1f} s")
    print(f"saved to {out}")
    return 0


# ---------------------------------------------------------------------- verify
def cmd_verify(args: argparse.Namespace) -> int:
    import torch

    from .io import load_model, load_tokenizer, read_growth_history
    from .verify import compare_outputs, model_dtype, random_inputs, tolerance_for

    a = load_model(args.src)  # each as stored; evaluated in fp32 below
    b = load_model(args.out)
    dtypes = (model_dtype(a), model_dtype(b))
    tolerance = tolerance_for(*dtypes) if args.tolerance is None else args.tolerance
    tok = load_tokenizer(args.src)
    mask = None
    if tok is not None and not args.random:
        texts = DEFAULT_SENTENCES
        if args.text:
            texts = [l for l in Path(args.text).read_text().splitlines() if l.strip()]
        texts = (texts * args.batch)[: args.batch]
        enc = tok(texts, return_tensors="pt", padding=True, truncation=True, max_length=args.seq_len)
        ids, mask = enc["input_ids"], enc["attention_mask"]
        source = f"{len(texts)} sentences tokenised with the source tokenizer"
    else:
        ids = random_inputs(a, args.batch, args.seq_len, args.seed)
        source = f"{ids.shape[0]}x{ids.shape[1]} random tokens"
    hist = read_growth_history(args.out)
    hidden_src = None
    if hist and hist[-1].get("hidden_index_map"):
        hidden_src = hist[-1]["hidden_index_map"]
    with torch.no_grad():
        res = compare_outputs(a, b, ids, attention_mask=mask, hidden_src=hidden_src, compute_dtype=torch.float32)
    res.update(dtypes=[str(d).removeprefix("torch.") for d in dtypes], tolerance=tolerance)
    ok = res["rel"] <= tolerance
    print(f"compared {res['kind']} on {source}")
    print(f"weights stored as {res['dtypes'][0]} (SRC) and {res['dtypes'][1]} (OUT), outputs computed in float32")
    print(f"max |delta| = {res['max_abs']:.3e}   max |{res['kind']}| = {res['max_ref']:.4g}   relative = {res['rel']:.3e}")
    if "min_cosine_mean_pooled" in res:
        print(f"min cosine similarity of mean-pooled embeddings = {res['min_cosine_mean_pooled']:.8f}")
    print(f"{'PASS' if ok else 'FAIL'}: relative deviation {'<=' if ok else '>'} tolerance {tolerance:g}")
    if args.json:
        print(json.dumps(res))
    return 0 if ok else 1


# ---------------------------------------------------------------------- parser
DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")  # progtrain.io.DTYPE_CHOICES (not imported: torch)
TOLERANCE_TEXT = "1e-5 relative for float32, 1.56e-2 (2 eps) for bfloat16, 1.95e-3 (2 eps) for float16"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="progtrain",
        description="Progressive training for Hugging Face transformers: grow models function-preservingly "
        "and pretrain them in stages.",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="log progress at INFO level")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    g = sub.add_parser(
        "grow",
        help="grow a Hugging Face checkpoint to larger sizes and save it as a standard checkpoint",
        description="Grow SRC (a local checkpoint directory, or a hub id when online) and save the grown model "
        "to OUT as a standard Hugging Face checkpoint (safetensors, same model class, tokenizer carried along, "
        "growth history in progtrain_growth.json). Unset sizes stay as they are. Example:\n"
        "  progtrain grow ./small ./big --hidden-size 768 --num-heads 24 --intermediate-size 3072",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    g.add_argument("src", help="source checkpoint: local directory or hub id")
    g.add_argument("out", help="output directory (must not exist or be empty unless --overwrite)")
    g.add_argument("--hidden-size", type=int, help="new residual width (integer multiples are exact by tiling)")
    g.add_argument("--num-heads", type=int, help="new number of attention (query) heads")
    g.add_argument("--num-kv-heads", type=int, help="new number of key/value heads (GQA families)")
    g.add_argument("--intermediate-size", type=int, help="new FFN width")
    g.add_argument("--num-layers", type=int, help="new number of layers (new ones start as identity blocks)")
    g.add_argument(
        "--layer-placement",
        type=_placement,
        default="interleave",
        help="where new layers go: interleave (default, spread evenly after old layers), top, "
        "or comma-separated 0-based indices of the new layers in the grown model",
    )
    g.add_argument("--init", default="function_preserving", help="init strategy for new parameters (default: function_preserving)")
    g.add_argument("--init-option", type=_kv, action="append", metavar="KEY=VALUE", help="option of the init strategy (repeatable)")
    g.add_argument("--symmetry-noise", type=float, default=1e-2, help="relative std of the cancelling noise on tiled copies")
    g.add_argument("--task", choices=["causal_lm", "masked_lm", "base"], help="load SRC as this task (default: its config's architecture)")
    g.add_argument("--data", help="text file for data-driven init strategies (default: the embedded corpus or random tokens)")
    g.add_argument("--calib-batches", type=int, default=4, help="batches of calibration data for data-driven strategies")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument(
        "--dtype",
        choices=DTYPE_CHOICES,
        default="auto",
        help="dtype of the grown checkpoint: auto (default) keeps SRC's, per tensor; float32, bfloat16 or float16 "
        "converts. The growth runs in fp32 and is rounded once; it is reported exact when max |delta| of the "
        "outputs (computed in fp32 from the weights as stored) is within " + TOLERANCE_TEXT,
    )
    g.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    g.set_defaults(func=cmd_grow)

    v = sub.add_parser(
        "verify",
        help="check that a grown checkpoint computes the same function as its source",
        description="Load SRC and OUT with plain transformers, feed both the same inputs (sentences tokenised with "
        "SRC's tokenizer when it has one, else random tokens) and print max |delta logits| absolute and relative "
        "to max |logits|. Headless models compare last hidden states folded back to the source width. Both "
        "models are loaded in the dtype they were saved in and evaluated in fp32, so half-precision weights "
        "are judged without run-time rounding. Exit 0 within --tolerance, 1 otherwise.",
    )
    v.add_argument("src")
    v.add_argument("out")
    v.add_argument("--batch", type=int, default=4)
    v.add_argument("--seq-len", type=int, default=32)
    v.add_argument(
        "--tolerance",
        type=float,
        help="max relative deviation (default: by the coarser of the two stored dtypes, " + TOLERANCE_TEXT + ")",
    )
    v.add_argument("--text", help="file with one sentence per line to tokenise")
    v.add_argument("--random", action="store_true", help="use random token ids even if a tokenizer exists")
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--json", action="store_true", help="also print the result as JSON")
    v.set_defaults(func=cmd_verify)

    for module in COMMAND_MODULES:
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name != module:
                raise
            continue  # command not installed in this build
        mod.register(sub)
    return p


# Modules that add sub-commands: each defines ``register(subparsers)``, which adds its parser and
# sets ``func`` (a callable taking the parsed args and returning an exit code). Raising
# ProgtrainConfigError from ``func`` gives the one-line message and exit code 2.
COMMAND_MODULES: list[str] = [
    "progtrain.train.commands",  # train, plan
    "progtrain.hub",  # push
]


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except ProgtrainConfigError as e:
        print(f"progtrain {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("progtrain: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
