"""How much memory a KTO run needs per GPU and per node, and whether it fits (kto_scale.plan).

    python launch/plan.py --config configs/llama3-8b-lora.yaml --nodes 1 --gpus_per_node 8 --gpu_memory 80GB
    python launch/plan.py --config my.yaml --nodes 2 --gpus_per_node 8 --gpu_memory 80GB --host_memory 1TB --fsdp full_shard --deepspeed null

Reads the model's config.json only (no weights). Any training option can be overridden as in
launch/train.py. Exit status 0 when the run fits, 1 when it does not, with what to change.
"""

import argparse
import sys

from kto_scale.config_io import load_config
from kto_scale.usage import options_help, run_command


def main() -> None:
    """Check the command line and the config, then print the estimate; a mistake ends with one line."""
    parser = argparse.ArgumentParser(description=__doc__, allow_abbrev=False, epilog=options_help(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=1, help="nodes in the cluster")
    parser.add_argument("--gpus_per_node", type=int, default=8, help="GPUs (ranks) per node")
    parser.add_argument("--gpu_memory", default="80GB", help="memory of one GPU, e.g. 80GB, 24GB")
    parser.add_argument("--host_memory", default=None, help="host RAM per node, e.g. 1TB (checked when given)")
    parser.add_argument("--examples", type=int, default=None, help="training examples (default: counted in a "
                        "local dataset_name; a hub dataset is not checked)")
    args, config_args = parser.parse_known_args()  # the rest are training options, --config first
    if args.nodes < 1 or args.gpus_per_node < 1:
        sys.exit(f"error: --nodes {args.nodes} --gpus_per_node {args.gpus_per_node}: both must be >= 1.")
    config = run_command(lambda: load_config(config_args))
    # After the config: --help and a mistyped option answer in a second, before transformers loads.
    from kto_scale.model_shape import read_shape
    from kto_scale.plan import Cluster, estimate, largest_micro_batch
    from kto_scale.plan_report import check_layout, parse_size, report, training_examples

    def plan() -> bool:
        cluster = Cluster(args.nodes, args.gpus_per_node, parse_size(args.gpu_memory, "--gpu_memory"),
                          None if args.host_memory is None else parse_size(args.host_memory, "--host_memory"))
        shape = read_shape(config)
        result = estimate(config, shape, cluster)
        check_layout(config, result, cluster, args.examples if args.examples is not None else training_examples(config))
        print(report(config, shape, cluster, result, largest_micro_batch(config, shape, cluster)))
        return result.gpu_peak <= cluster.gpu_memory

    sys.exit(0 if run_command(plan) else 1)


if __name__ == "__main__":
    main()
