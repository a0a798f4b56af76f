"""``progtrain`` command line: grow | verify | train | eval | plan | push | data.

Bad input exits with code 2 and one line on stderr; ``verify`` exits 1 when outputs differ by more
than the tolerance.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import logging
import sys
import typing
from pathlib import Path
from typing import Any, Callable, Sequence

import yaml

from .errors import ProgtrainConfigError, ProgtrainError
from .growth.spec import GrowthSpec
from .strategy_catalog import OPTIONS_HELP, STRATEGIES
from .text import text_table

# Building the parser imports no torch, transformers or accelerate (``progtrain --help`` answers in well
# under 2 s): ``GrowthSpec``, the strategy catalog and the table helper are light modules, and each command
# imports the heavy stack in its function (``cmd_grow``, ``cmd_verify``, progtrain.train.commands, progtrain.hub).

logger = logging.getLogger("progtrain")

DEFAULT_SENTENCES = [
    "Progressive training grows a small model into a large one.",
    "The quick brown fox jumps over the lazy dog.",
    "Shall I compare thee to a summer's day? Thou art more lovely and more temperate.",
    "Function-preserving growth keeps the logits of the model unchanged.",
]


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One ``--flag`` per field of the dataclass ``cls`` (HfArgumentParser style): the flag is the
    field name with dashes, its help the field's ``metadata["help"]``, its default the field's; the
    value is parsed by ``metadata["parse"]`` or the field's type (``int | None`` -> int), with
    ``metadata["choices"]`` / ``["metavar"]`` passed on. A name and its help exist once, in ``cls``."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        meta = f.metadata
        parse = meta.get("parse") or next(
            (t for t in typing.get_args(hints[f.name]) or (hints[f.name],) if t in (int, float, str)), str
        )
        default = None if f.default is dataclasses.MISSING else f.default
        help_text = meta.get("help", "")
        if default is not None:
            help_text += f" (default: {default})"
        parser.add_argument(
            "--" + f.name.replace("_", "-"), dest=f.name, type=_argparse_type(parse), default=default,
            choices=meta.get("choices"), metavar=meta.get("metavar"), help=help_text,
        )


def dataclass_from_args(cls: type, args: argparse.Namespace) -> Any:
    """The dataclass ``cls`` from the flags :func:`add_dataclass_arguments` added."""
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


def _argparse_type(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """``parse`` with its ProgtrainConfigError shown by argparse as the reason (exit 2)."""

    def wrapped(value: str) -> Any:
        try:
            return parse(value)
        except ProgtrainConfigError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    wrapped.__name__ = getattr(parse, "__name__", "value")
    return wrapped


def _kv(value: str) -> tuple[str, Any]:
    if "=" not in value:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {value!r}")
    k, v = value.split("=", 1)
    return k.strip(), yaml.safe_load(v)


# ---------------------------------------------------------------------- grow
def cmd_grow(args: argparse.Namespace) -> int:
    from .quiet import deepspeed_probe_off, transformers_bars_off

    deepspeed_probe_off()
    with transformers_bars_off():
        return _grow(args)


def _grow(args: argparse.Namespace) -> int:
    from .growth import grow, plan_growth
    from .io import check_output_dir, load_hf_config, load_model, load_tokenizer, read_growth_history, save_checkpoint

    spec = dataclass_from_args(GrowthSpec, args)
    out = Path(args.out)
    check_output_dir(out, args.overwrite)
    # plan the growth (sizes, layer sources, strategy, grown config) before loading any weights
    from transformers import AutoTokenizer

    config = load_hf_config(args.src, args.task)
    plan = plan_growth(config, spec, init=args.init, init_kwargs=dict(args.init_option or []))
    strategy = plan.strategy
    if args.calib_batches < 1:
        raise ProgtrainConfigError(f"--calib-batches must be at least 1, got {args.calib_batches}")
    model = load_model(args.src, task=args.task)  # in the dtype it was saved in
    tokenizer = load_tokenizer(args.src)
    data = None
    if strategy.needs_data:
        from .growth.calibration import calibration_batches, fit_problems, input_limits

        calib_tok = tokenizer
        if args.tokenizer:
            try:
                calib_tok = AutoTokenizer.from_pretrained(args.tokenizer)
            except Exception as e:
                raise ProgtrainConfigError(
                    f"--tokenizer {args.tokenizer!r}: cannot load a tokenizer ({type(e).__name__}: "
                    f"{(str(e).splitlines() or [''])[0]}); pass a directory with tokenizer files"
                ) from None
            problems = fit_problems(input_limits(model), tokenizer=calib_tok,
                                    masked=type(model).__name__.endswith("ForMaskedLM"))
            if problems:
                raise ProgtrainConfigError(
                    f"--tokenizer {args.tokenizer} does not fit {args.src}: {'; '.join(problems)}; "
                    f"pass the tokenizer the model was trained with"
                )
        data = calibration_batches(model, calib_tok, args.data, n_batches=args.calib_batches, seed=args.seed)
    model.eval()
    res = grow(model, plan, seed=args.seed, data=data, dtype=args.dtype)
    history = read_growth_history(args.src) + [dict(res.record, source_path=str(args.src))]
    from .card import license_of, render_model_card
    from .carry import plan_carry

    # a local source's other files are carried (its tokenizer files verbatim); a hub id gives the
    # model, its generation settings and the loaded tokenizer only
    local = Path(args.src).is_dir()
    card = render_model_card(config=res.model.config, growth_history=history, base_model=str(args.src),
                             license_info=license_of(Path(args.src) / "README.md") if local else None)
    plan = plan_carry(args.src, config, res.model.config, tokenizer_saved=not local, card_written=True)
    save_checkpoint(
        res.model, out, tokenizer=None if local else tokenizer, history=history, extra_files={"README.md": card},
        overwrite=args.overwrite, carry_from=args.src if local else None,
    )

    s, t = res.source_sizes.as_dict(), res.target_sizes.as_dict()
    rows = [("size", "before", "after")] + [(k, s[k], t[k]) for k in s]
    rows.append(("parameters", f"{res.record['params_before']:,}", f"{res.record['params_after']:,}"))
    print(text_table(rows))
    print("\n" + _growth_status(res.deviation, res.exact, res.notes))
    d_src, d_out = res.deviation["dtypes"]
    print(f"dtype: {d_src} -> {d_out}   (weights as stored, outputs computed in float32)")
    print(f"init: {strategy.name}   seed: {args.seed}   time: {res.record['seconds']:.1f} s")
    _print_carry(plan, args.src, local)
    print(f"saved to {out}")
    return 0


def _print_carry(plan: Sequence[Any], src: str, local: bool) -> None:
    """Which files of the source directory were not carried (and why), updated, or carried unknown."""
    if not local:
        print(f"files: {src} is not a local directory, so only the model, its generation settings and the "
              f"tokenizer were carried (download it with `hf download {src} --local-dir DIR` and grow DIR "
              f"to carry its other files)")
        return
    not_carried = [d for d in plan if not d.carried]
    if not_carried:
        print("files of the source not carried:")
        w = max(len(d.path) for d in not_carried)
        for d in not_carried:
            print(f"  {d.path.ljust(w)}  {'replaced' if d.action == 'rewrite' else 'dropped'}: {d.reason}")
    for d in plan:
        if d.action == "update":
            print(f"updated {d.path}: {d.reason}")
    unknown = [d.path for d in plan if d.carried and d.rule == "unknown"]
    if unknown:
        print(f"carried as is (not known checkpoint files): {', '.join(unknown)}")
    carried = sum(d.carried for d in plan)
    print(f"carried {carried} of {len(plan)} source files")


def _growth_status(dev: dict, exact: bool | None, notes: Sequence[str]) -> str:
    """The measured deviation and the label it gives: "exact" only when it is within the tolerance."""
    shapes = ", ".join(f"{b}x{n}" for b, n in dev["probes"])
    line = (
        f"max |delta {dev['kind']}| = {dev['max_abs']:.3e}  ({dev['rel']:.3e} of max |{dev['kind']}| "
        f"= {dev['max_ref']:.3g}) on random tokens ({shapes}): "
    )
    if exact:
        return line + f"exact (relative deviation <= tolerance {dev['tolerance']:g})"
    why = "; ".join(notes) if notes else "no known reason"
    return line + f"APPROXIMATE (relative deviation > tolerance {dev['tolerance']:g}): {why}"


# ---------------------------------------------------------------------- verify
def cmd_verify(args: argparse.Namespace) -> int:
    from .quiet import deepspeed_probe_off, transformers_bars_off

    deepspeed_probe_off()
    with transformers_bars_off():
        return _verify(args)


def _verify(args: argparse.Namespace) -> int:
    from .growth.calibration import fit_problems, input_limits
    from .io import load_model, load_tokenizer, read_growth_history
    from .verify import hidden_map_since, measure_deviation

    a = load_model(args.src)  # each as stored; evaluated in fp32 by measure_deviation
    b = load_model(args.out)
    tok = load_tokenizer(args.src)
    ids = mask = None
    # sentences within both models' limits: positions cap the length, the tokenizer's ids must fit
    max_len = min([args.seq_len] + [m for m in (input_limits(a).max_positions, input_limits(b).max_positions) if m])
    if tok is not None and not args.random:
        problems = fit_problems(input_limits(a), tokenizer=tok) + fit_problems(input_limits(b), tokenizer=tok)
        if problems:
            logger.warning("not using the tokenizer of %s (%s): comparing on random tokens", args.src, problems[0])
            tok = None
    if tok is not None and not args.random:
        texts = DEFAULT_SENTENCES
        if args.text:
            texts = [l for l in Path(args.text).read_text().splitlines() if l.strip()]
        texts = (texts * args.batch)[: args.batch]
        ids, mask = _tokenise(tok, texts, max_len, int(a.config.vocab_size))
        source = f"{len(texts)} sentences tokenised with the source tokenizer"
        if ids is None:
            logger.warning("the source tokenizer gives no usable token ids for the sentences: using random tokens")
    if ids is None:
        source = f"{args.batch}x{max_len} random tokens"
    # OUT's growth history leads from SRC's width to OUT's (composed over every growth since SRC)
    hidden_src = hidden_map_since(read_growth_history(args.out), _hidden_size(a), _hidden_size(b))
    if input_limits(b).vocab_size < input_limits(a).vocab_size:
        raise ProgtrainConfigError(f"{args.out} has a smaller vocabulary ({input_limits(b).vocab_size}) than "
                                   f"{args.src} ({input_limits(a).vocab_size}): OUT must be a growth of SRC")
    # the measurement grow() labels its growths with, here on the inputs chosen above
    try:
        res = measure_deviation(
            a, b, input_ids=ids, attention_mask=mask, batch=args.batch, seq_len=args.seq_len, seed=args.seed,
            hidden_src=hidden_src, tolerance=args.tolerance,
        )
    except (ValueError, IndexError, RuntimeError) as e:
        raise ProgtrainConfigError(f"cannot compare {args.src} with {args.out}: {e}; OUT must be a growth of SRC "
                                   f"(same family, made by progtrain grow or a progtrain run from it)") from None
    ok = res["within_tolerance"]
    tol = res["tolerance"]
    print(f"compared {res['kind']} on {source}")
    print(f"weights stored as {res['dtypes'][0]} (SRC) and {res['dtypes'][1]} (OUT), outputs computed in float32")
    print(f"max |delta| = {res['max_abs']:.3e}   max |{res['kind']}| = {res['max_ref']:.4g}   relative = {res['rel']:.3e}")
    if "min_cosine_mean_pooled" in res:
        print(f"min cosine similarity of mean-pooled embeddings = {res['min_cosine_mean_pooled']:.8f}")
    print(f"{'PASS' if ok else 'FAIL'}: relative deviation {'<=' if ok else '>'} tolerance {tol:g}")
    if args.json:
        print(json.dumps(res))
    return 0 if ok else 1


def _hidden_size(model: Any) -> int:
    """The residual-stream width of a supported model (its adapter's reading of the config)."""
    from .arch import get_adapter

    return get_adapter(model.config).read_sizes(model.config).hidden


def _tokenise(tok: Any, texts: list[str], max_len: int, vocab: int) -> tuple[Any, Any]:
    """``(input_ids, attention_mask)`` of ``texts``, padded; ``(None, None)`` when the tokenizer cannot
    give usable ids (no tokens, ids outside the model's vocabulary)."""
    if tok.pad_token is None and getattr(tok, "eos_token", None) is not None:
        import copy

        tok = copy.copy(tok)  # padded positions are masked out; any token id does
        tok.pad_token = tok.eos_token
    if tok.pad_token is None:
        return None, None
    enc = tok(texts, return_tensors="pt", padding=True, truncation=True, max_length=max_len)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    if ids.numel() == 0 or not bool(mask.any(dim=1).all()) or int(ids.max()) >= vocab or int(ids.min()) < 0:
        return None, None
    return ids, mask


# ---------------------------------------------------------------------- parser
DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")  # progtrain.io.DTYPE_CHOICES (not imported: torch)
TOLERANCE_TEXT = "1e-5 relative for float32, 1.56e-2 (2 eps) for bfloat16, 1.95e-3 (2 eps) for float16"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="progtrain",
        description="Progressive training for Hugging Face transformers: grow models function-preservingly "
        "and pretrain them in stages.",
        epilog="exit codes: 0 success; 1 runtime failure (Hub/network error, diverged training, `verify` "
        "outside its tolerance); 2 bad input (one line on stderr naming the fix, nothing written); 130 interrupted",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="log progress at INFO level")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    _register_grow(sub)
    _register_verify(sub)
    for module in COMMAND_MODULES:
        importlib.import_module(module).register(sub)
    return p




def _register_grow(sub: Any) -> None:
    """The ``grow`` sub-command: size flags generated from :class:`GrowthSpec`, strategy list from the catalog."""
    g = sub.add_parser(
        "grow",
        help="grow a Hugging Face checkpoint to larger sizes and save it as a standard checkpoint",
        description="Grow SRC (a local checkpoint directory, or a hub id when online) and save the grown model "
        "to OUT as a standard Hugging Face checkpoint (safetensors, same model class, growth history in "
        "progtrain_growth.json). The files of SRC that the growth does not invalidate are carried along "
        "(generation settings, tokenizer, sentence-transformers modules with the embedding size updated, custom "
        "code, unknown small files); the ones not carried are listed with the reason. Unset sizes stay as "
        "they are. Example:\n"
        "  progtrain grow ./small ./big --hidden-size 768 --num-heads 24 --intermediate-size 3072",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    g.add_argument("src", help="source checkpoint: local directory or hub id")
    g.add_argument("out", help="output directory (must not exist or be empty unless --overwrite)")
    add_dataclass_arguments(g, GrowthSpec)  # --hidden-size ... --symmetry-noise
    g.add_argument("--init", default="function_preserving", metavar="NAME",
                   help=f"init strategy for new parameters: {', '.join(STRATEGIES)} (default: "
                   "function_preserving; each is described below)")
    g.add_argument("--init-option", type=_kv, action="append", metavar="KEY=VALUE",
                   help="option of the init strategy (repeatable); the options of each strategy, their types and "
                   "defaults are listed below (also progtrain.init.describe_options(NAME))")
    g.epilog = "init strategies and their options (--init NAME --init-option KEY=VALUE):\n" + OPTIONS_HELP
    g.add_argument("--task", choices=["causal_lm", "masked_lm", "base"], help="load SRC as this task (default: its config's architecture)")
    g.add_argument(
        "--data",
        help="text file for data-driven init strategies (gradinit, gradmax, signed_split), tokenised with "
        "--tokenizer or SRC's tokenizer; default: the embedded corpus, or, when SRC has no tokenizer or one whose "
        "ids exceed the model's vocabulary, token sequences sampled from the model itself (with a warning)",
    )
    g.add_argument(
        "--tokenizer",
        metavar="DIR",
        help="tokenizer (directory or hub id) for the calibration text of data-driven strategies, when SRC has "
        "none or a mismatched one; its ids must fit the model's vocabulary. Not saved with OUT",
    )
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


def _register_verify(sub: Any) -> None:
    """The ``verify`` sub-command."""
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
        default=None,
        help="max relative deviation (default: by the coarser of the two stored dtypes, " + TOLERANCE_TEXT + ")",
    )
    v.add_argument("--text", help="file with one sentence per line to tokenise")
    v.add_argument("--random", action="store_true", help="use random token ids even if a tokenizer exists")
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--json", action="store_true", help="also print the result as JSON")
    v.set_defaults(func=cmd_verify)


# Modules that add sub-commands: each defines ``register(subparsers)``, which adds its parser and
# sets ``func`` (a callable taking the parsed args and returning an exit code). A ProgtrainError raised
# from ``func`` gives the one-line message and its exit code (:func:`run_command`).
COMMAND_MODULES: list[str] = [
    "progtrain.train.commands",  # train, eval, plan
    "progtrain.hub",  # push
    "progtrain.train.data_commands",  # data prepare
]


class _StderrHandler(logging.StreamHandler):
    """Writes to ``sys.stderr`` as it is when a record is emitted (commands also run in-process, with
    stderr redirected)."""

    @property
    def stream(self) -> Any:  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, _value: Any) -> None:
        pass


def console_logging(verbose: bool = False) -> None:
    """Logging for the command line, on stderr (stdout is for results): WARNING and above from every
    library (INFO with ``verbose``), and progtrain's run messages (``progtrain.console``: resumed from,
    growths, interruption) as plain lines."""
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    console = logging.getLogger("progtrain.console")
    if not any(isinstance(h, _StderrHandler) for h in console.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        console.addHandler(handler)
    console.setLevel(logging.INFO)
    console.propagate = False


def run_command(func: Callable[[argparse.Namespace], int | None], args: argparse.Namespace, prog: str) -> int:
    """Run one command and map progtrain's errors to exit codes (the one place that does).

    A :class:`~progtrain.errors.ProgtrainError` prints ``PROG: error: MESSAGE`` (one line) on stderr and
    returns its ``exit_code``: 2 for bad input, 1 for a network/Hub failure or diverged training;
    Ctrl-C returns 130. Any other exception is a bug and keeps its traceback.
    """
    try:
        return int(func(args) or 0)
    except ProgtrainError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        hint = " (run the same command with --resume to continue from the last checkpoint)" if hasattr(args, "resume") else ""
        print(f"{prog}: interrupted{hint}", file=sys.stderr)
        return 130


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    console_logging(args.verbose)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return run_command(args.func, args, f"progtrain {args.command}")


if __name__ == "__main__":
    sys.exit(main())
