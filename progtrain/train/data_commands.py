"""``progtrain data prepare CONFIG`` (registered into the CLI by ``progtrain.cli``)."""

from __future__ import annotations

import argparse
from typing import Any


def cmd_data_prepare(args: argparse.Namespace) -> int:
    """Tokenise the config's corpus into token shards (or check existing ones) and print a summary."""
    from .config import load_config
    from .shards import prepared_dir

    from ..io import remove_if_empty

    cfg = load_config(args.config, args.overrides, args.output_dir)
    d = prepared_dir(cfg)
    try:
        return _prepare(args, cfg, d)
    except BaseException:  # bad input found while reading the sources: leave no empty directories behind
        remove_if_empty(d)
        if not d.exists():
            remove_if_empty(d.parent)
        raise


def _prepare(args: argparse.Namespace, cfg: Any, d: Any) -> int:
    from .shards import check_manifest, prepare, read_manifest

    m = read_manifest(d)
    if m is not None and not args.overwrite:
        check_manifest(cfg, d, m)
        print(f"{d} is already prepared for this config (pass --overwrite to prepare it again)")
    else:
        if d.exists() and any(d.iterdir()) and not args.overwrite:
            from ..errors import ProgtrainConfigError

            raise ProgtrainConfigError(f"{d} exists and is not prepared data: pass --overwrite or set data.prepared_dir")
        prepare(cfg, overwrite=True)
        m = read_manifest(d)
    tr, va = m["splits"]["train"], m["splits"]["val"]
    print(f"{d}: {tr['blocks']:,} train / {va['blocks']:,} val blocks of {m['seq_len']} tokens "
          f"({tr['tokens']:,} / {va['tokens']:,} tokens from {tr['docs']:,} / {va['docs']:,} documents), "
          f"{m['dtype']}, vocabulary {m['vocab_size']:,}, prepared in {m['prepare_s']} s")
    return 0


def register(subparsers: Any) -> None:
    """Add the ``data`` command (``data prepare``)."""
    d = subparsers.add_parser("data", help="prepare training data: tokenise once into memory-mapped token shards")
    dsub = d.add_subparsers(dest="data_command", metavar="{prepare}")
    p = dsub.add_parser(
        "prepare",
        help="tokenise a run config's corpus into token shards and a manifest",
        description="Read the config's data (text/JSONL/JSON/Parquet/CSV files, directories, globs, saved datasets "
        "directories, hub datasets), train or load the tokenizer, and write seq_len blocks of token ids as "
        "memory-mapped shards plus manifest.json to data.prepared_dir (default OUTPUT_DIR/data), atomically. "
        "`progtrain train` runs this itself when the prepared data is missing. Example:\n"
        "  progtrain data prepare configs/gpt2_tiny_progressive.yaml --set data.files=[corpus/]",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("config", help="YAML run config")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, as for train")
    p.add_argument("--output-dir", help="output directory of the run (the default prepared_dir is OUTPUT/data)")
    p.add_argument("--overwrite", action="store_true", help="prepare again even if prepared data exists")
    p.set_defaults(func=cmd_data_prepare)
    d.set_defaults(func=lambda args: (d.print_help(), 2)[1])
