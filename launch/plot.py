"""Plot KTO training runs: python launch/plot.py RUN_DIR [RUN_DIR ...] [--output FILE.png]."""

import argparse

from kto_scale.plot import plot_runs
from kto_scale.usage import run_command


def main() -> None:
    """Parse the command line, write the PNG and print its path."""
    parser = argparse.ArgumentParser(description="Plot the metrics.jsonl of one or more KTO runs.")
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run output directories")
    parser.add_argument(
        "--output", help="PNG path (default: RUN_DIR/plots.png for one run, ./kto_runs.png for several)"
    )
    args = parser.parse_args()
    print(run_command(lambda: plot_runs(args.run_dirs, args.output)))


if __name__ == "__main__":
    main()
