"""Files shipped with the package: the demo's tiny Llama (config and tokenizer) and KTO sample set."""

from pathlib import Path

ASSETS_DIR = Path(__file__).parent
TINY_LLAMA_DIR = ASSETS_DIR / "tiny-llama"  # config.json + tokenizer files, no weights (random init)
DEMO_DATA = ASSETS_DIR / "demo_kto.jsonl"  # unpaired {prompt, completion, label} rows
