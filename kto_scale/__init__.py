"""kto-scale: KTO alignment for large Llama-family models on DeepSpeed ZeRO."""

__version__ = "0.1.0"
