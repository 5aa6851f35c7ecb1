"""Score a dataset with a trained adapter (see kto_scale.evaluate).

    python launch/evaluate.py --config outputs/run/kto_config.yaml --adapter outputs/run/adapter --output outputs/run/eval
    deepspeed --num_gpus 8 launch/evaluate.py --config ... --adapter ... --output ... [--split train]
    torchrun --nproc_per_node 8 launch/evaluate.py --config <an fsdp run>/kto_config.yaml --adapter ... --output ...

Any training option can be overridden as in launch/train.py (e.g. --eval_dataset_name other.jsonl).
"""

import argparse

from kto_scale.usage import config_from_command_line, options_help, run_command


def main() -> None:
    """Check the command line and the config, then score; a mistake ends with a one-line error."""
    parser = argparse.ArgumentParser(description=__doc__, allow_abbrev=False, epilog=options_help(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", required=True, help="peft adapter directory (e.g. outputs/run/adapter)")
    parser.add_argument("--output", required=True, help="directory for examples.jsonl and summary.json "
                        "(and generations.jsonl with --generate_during_eval true)")
    parser.add_argument("--split", choices=("eval", "train"), default="eval", help="which split of the data")
    args, config_args = parser.parse_known_args()  # the rest are training options, --config first
    config = config_from_command_line(config_args, __doc__)
    # After the config: --help and a mistyped option answer in a second, before torch and peft load.
    from kto_scale.distributed import exit_without_teardown
    from kto_scale.evaluate import evaluate

    summary = run_command(lambda: evaluate(config, args.adapter, args.output, args.split))
    print("  ".join(f"{k}={v:.4f}" for k, v in summary.items()))
    exit_without_teardown()  # the job is done and written: no interpreter teardown (see its docstring)


if __name__ == "__main__":
    main()
