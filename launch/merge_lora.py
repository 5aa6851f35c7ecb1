"""Merge a LoRA adapter into its base model, or export a clean peft adapter (see kto_scale.export).

    python launch/merge_lora.py --base BASE --adapter ADAPTER_OR_DEEPSPEED_CKPT --output DIR [--dtype bf16]
    python launch/merge_lora.py --base BASE --adapter DEEPSPEED_CKPT --output DIR --adapter_only
"""

import argparse
import logging

from kto_scale.usage import run_command

DTYPES = ("bf16", "fp16", "fp32")  # kto_scale.export.DTYPES' names, here without importing torch for --help


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True,
                        help="base model dir (with --adapter_only also a hub id, recorded in adapter_config.json)")
    parser.add_argument("--adapter", required=True, help="peft adapter dir, or DeepSpeed checkpoint dir")
    parser.add_argument("--output", required=True, help="directory to write")
    parser.add_argument("--dtype", choices=DTYPES, help="merged weights' dtype (default: the base's)")
    parser.add_argument("--max_shard_size", default="5GB", help="largest merged shard, e.g. 5GB, 500MB")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --output")
    parser.add_argument("--allow_pickle", action="store_true",
                        help="read pickled pytorch_model*.bin / adapter_model.bin weights (they can run code)")
    parser.add_argument("--adapter_only", action="store_true",
                        help="write a clean peft adapter dir instead of merging")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Run the export the command line asks for; bad input ends with a one-line error."""
    args = parse_args(argv)
    # After the command line: --help and a mistyped option answer in a second, before torch loads.
    from kto_scale.export import export_adapter, merge_lora

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.adapter_only:
        run_command(lambda: export_adapter(args.base, args.adapter, args.output, args.overwrite, args.allow_pickle))
    else:
        run_command(lambda: merge_lora(args.base, args.adapter, args.output, args.dtype, args.max_shard_size,
                                       args.overwrite, args.allow_pickle))


if __name__ == "__main__":
    main()
