"""A Llama-family decoder's sizes, read from its config.json alone (never its weights): the shape the
capacity planner (kto_scale.plan) computes with."""

from dataclasses import dataclass

from transformers import AutoConfig

from kto_scale.config import ConfigError, KTOConfig

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class ModelShape:
    """A Llama-family decoder's sizes, from config.json."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    attention_bias: bool = False
    mlp_bias: bool = False

    @classmethod
    def from_model_config(cls, model_config, name: str) -> "ModelShape":
        c = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
        try:
            heads = c.num_attention_heads
            return cls(layers=c.num_hidden_layers, hidden=c.hidden_size, intermediate=c.intermediate_size,
                       heads=heads, kv_heads=getattr(c, "num_key_value_heads", None) or heads,
                       head_dim=getattr(c, "head_dim", None) or c.hidden_size // heads, vocab=c.vocab_size,
                       tied=bool(getattr(c, "tie_word_embeddings", False)),
                       attention_bias=bool(getattr(c, "attention_bias", False)),
                       mlp_bias=bool(getattr(c, "mlp_bias", False)))
        except AttributeError as e:
            raise ConfigError(f"model_name_or_path {name!r}: its config.json lacks {e.name} (the planner reads "
                              "Llama-family configs: hidden_size, intermediate_size, num_hidden_layers, ...).") from None

    @property
    def attention_width(self) -> int:  # A
        return self.heads * self.head_dim

    @property
    def kv_width(self) -> int:  # K
        return self.kv_heads * self.head_dim

    def projections(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each linear projection of a layer."""
        h, a, k, i = self.hidden, self.attention_width, self.kv_width, self.intermediate
        return {"q_proj": (h, a), "k_proj": (h, k), "v_proj": (h, k), "o_proj": (a, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    @property
    def linear_params(self) -> int:
        """Linear weights of the decoder layers (what bitsandbytes quantizes)."""
        return self.layers * sum(i * o for i, o in self.projections().values())

    @property
    def layer_params(self) -> int:
        biases = (self.attention_width + 2 * self.kv_width) * self.attention_bias \
            + (2 * self.intermediate + self.hidden) * self.mlp_bias
        return sum(i * o for i, o in self.projections().values()) + 2 * self.hidden + biases

    @property
    def edge_params(self) -> int:
        """Embedding, LM head (unless tied) and final norm: the weights outside the decoder layers."""
        return self.vocab * self.hidden * (1 if self.tied else 2) + self.hidden

    @property
    def params(self) -> int:
        return self.layers * self.layer_params + self.edge_params

    def lora_params(self, r: int, targets: list[str] | None) -> int:
        """Trainable LoRA parameters: r (in + out) per adapted projection of every layer."""
        chosen = self.projections() if not targets else {
            name: shape for name, shape in self.projections().items() if name in targets}
        unknown = sorted(set(targets or ()) - set(PROJECTIONS))
        if unknown:
            raise ConfigError(f"lora_target_modules {unknown}: the planner knows the Llama projections {PROJECTIONS}.")
        return self.layers * sum(r * (i + o) for i, o in chosen.values())


def read_shape(config: KTOConfig) -> ModelShape:
    """The model's shape from its config.json: a local dir, or a hub id's config.json (from the hub cache,
    else fetched: that one small file only)."""
    def read(local_only: bool):
        return AutoConfig.from_pretrained(config.model_name_or_path, revision=config.model_revision,
                                          trust_remote_code=config.trust_remote_code, local_files_only=local_only)
    try:
        try:  # the hub cache first: no network round trips (or retries, offline) for a config already here
            model_config = read(local_only=True)
        except OSError:
            model_config = read(local_only=False)
    except (OSError, ValueError) as e:
        raise ConfigError(f"model_name_or_path {config.model_name_or_path!r}: cannot read its config.json "
                          f"({str(e).splitlines()[0]}). Check the path or the hub id.") from None
    return ModelShape.from_model_config(model_config, config.model_name_or_path)
