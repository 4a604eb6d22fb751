"""Frozen, keyword-only model configs with presets, and strict parsing of Hugging Face config.json files.

Parsing is an allowlist: every HF field is either mapped, known to be irrelevant to the forward pass (dropout,
generation defaults, bookkeeping), or required to hold the one value we implement. Anything else is refused, so a
checkpoint needing a feature we lack fails loudly instead of loading with silently different numerics.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from maxmin_jax.errors import ConfigError  # also raised when a Hugging Face config asks for what we lack


# Fields any HF config may carry that do not change the forward pass of a causal LM.
_BOOKKEEPING = frozenset({
    "architectures", "transformers_version", "dtype", "torch_dtype", "_name_or_path", "model_type",
    "bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id", "decoder_start_token_id", "use_cache",
    "initializer_range", "id2label", "label2id", "task_specific_params", "output_attentions",
    "output_hidden_states", "return_dict", "is_encoder_decoder", "tokenizer_class", "prefix", "problem_type",
    "gradient_checkpointing", "max_length", "min_length", "do_sample", "early_stopping", "num_beams",
    "temperature", "top_k", "top_p", "repetition_penalty", "length_penalty", "no_repeat_ngram_size",
    "bad_words_ids", "num_return_sequences", "chunk_size_feed_forward", "finetuning_task", "torchscript",
    "use_return_dict", "tf_legacy_loss", "pruned_heads", "is_decoder", "cross_attention_hidden_size",
    "tie_encoder_decoder", "quantization_config_", "_attn_implementation_autoset",
})


def _check_fields(hf: dict[str, Any], mapped: set[str], ignored: set[str], fixed: dict[str, Any], family: str):
    unknown = sorted(set(hf) - mapped - ignored - set(fixed) - _BOOKKEEPING)
    if unknown:
        raise ConfigError(f"{family} config.json has fields this loader does not handle: {unknown}. "
                          "Refusing to load rather than risk different numerics.")
    wrong = {k: hf[k] for k, v in fixed.items() if k in hf and hf[k] != v and not (v is None and not hf[k])}
    if wrong:
        expected = {k: fixed[k] for k in wrong}
        raise ConfigError(f"{family} config.json asks for unsupported settings {wrong}; implemented: {expected}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class GPT2Config:
    """GPT-2: learned positions, pre-LayerNorm blocks, fused QKV (HF Conv1D), GELU (tanh) MLP, tied LM head."""

    vocab_size: int = 50257
    """Rows of the token embedding (and of the tied LM head)."""
    max_position_embeddings: int = 1024
    """Rows of the learned position embedding: the longest sequence the model accepts."""
    hidden_size: int = 768
    """Width of the residual stream (HF `n_embd`)."""
    num_layers: int = 12
    """Number of transformer blocks (HF `n_layer`)."""
    num_heads: int = 12
    """Attention heads per block (HF `n_head`); `hidden_size` must divide evenly."""
    intermediate_size: int | None = None
    """MLP width (HF `n_inner`); None means 4 * hidden_size."""
    layer_norm_epsilon: float = 1e-5
    """Epsilon of every LayerNorm."""

    model_type: ClassVar[str] = "gpt2"

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def dim_per_head(self) -> int:
        """The name LlamaConfig uses (its `head_dim` is an optional override), so family-agnostic code reads one."""
        return self.head_dim

    @property
    def mlp_size(self) -> int:
        return self.intermediate_size or 4 * self.hidden_size

    @property
    def num_kv_heads(self) -> int:
        return self.num_heads

    @property
    def tie_word_embeddings(self) -> bool:
        return True

    # Presets: the four released GPT-2 sizes, and a tiny one for tests and the demo.
    @classmethod
    def gpt2(cls) -> GPT2Config:
        return cls()

    @classmethod
    def gpt2_medium(cls) -> GPT2Config:
        return cls(hidden_size=1024, num_layers=24, num_heads=16)

    @classmethod
    def gpt2_large(cls) -> GPT2Config:
        return cls(hidden_size=1280, num_layers=36, num_heads=20)

    @classmethod
    def gpt2_xl(cls) -> GPT2Config:
        return cls(hidden_size=1600, num_layers=48, num_heads=25)

    @classmethod
    def tiny(cls, *, vocab_size: int = 128, max_position_embeddings: int = 64) -> GPT2Config:
        return cls(vocab_size=vocab_size, max_position_embeddings=max_position_embeddings, hidden_size=32,
                   num_layers=2, num_heads=4)

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> GPT2Config:
        mapped = {"vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_inner", "layer_norm_epsilon"}
        ignored = {"attn_pdrop", "embd_pdrop", "resid_pdrop", "summary_activation", "summary_first_dropout",
                   "summary_proj_to_labels", "summary_type", "summary_use_proj", "n_ctx",
                   # Upcasting and reordering only change float16 overflow behaviour; we softmax in float32.
                   "reorder_and_upcast_attn"}
        fixed = {"activation_function": "gelu_new", "add_cross_attention": False, "scale_attn_weights": True,
                 "scale_attn_by_inverse_layer_idx": False, "tie_word_embeddings": True}
        _check_fields(hf, mapped, ignored, fixed, "gpt2")
        return cls(vocab_size=hf["vocab_size"], max_position_embeddings=hf["n_positions"],
                   hidden_size=hf["n_embd"], num_layers=hf["n_layer"], num_heads=hf["n_head"],
                   intermediate_size=hf.get("n_inner"), layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-5))

    def to_hf(self) -> dict[str, Any]:
        return {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": self.vocab_size,
                "n_positions": self.max_position_embeddings, "n_embd": self.hidden_size, "n_layer": self.num_layers,
                "n_head": self.num_heads, "n_inner": self.intermediate_size,
                "layer_norm_epsilon": self.layer_norm_epsilon, "activation_function": "gelu_new",
                "tie_word_embeddings": True}


@dataclasses.dataclass(frozen=True, kw_only=True)
class LlamaConfig:
    """Llama family: RMSNorm, rotary positions, grouped-query attention (MHA/GQA/MQA), SwiGLU MLP."""

    vocab_size: int = 32000
    """Rows of the token embedding and of the LM head."""
    max_position_embeddings: int = 4096
    """Longest sequence the model is meant for (RoPE itself has no table)."""
    hidden_size: int = 4096
    """Width of the residual stream."""
    num_layers: int = 32
    """Number of decoder layers (HF `num_hidden_layers`)."""
    num_heads: int = 32
    """Query heads per layer (HF `num_attention_heads`)."""
    num_kv_heads: int = 32
    """Key/value heads: equal to num_heads is MHA, 1 is MQA, in between GQA."""
    head_dim: int | None = None
    """Per-head width; None means hidden_size // num_heads."""
    intermediate_size: int = 11008
    """SwiGLU inner width."""
    rms_norm_eps: float = 1e-5
    """Epsilon of every RMSNorm."""
    rope_theta: float = 10000.0
    """RoPE base frequency."""
    tie_word_embeddings: bool = False
    """Whether the LM head reuses the token embedding."""

    model_type: ClassVar[str] = "llama"

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        if self.head_dim is None and self.hidden_size % self.num_heads:
            raise ConfigError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads

    @property
    def mlp_size(self) -> int:
        return self.intermediate_size

    @classmethod
    def llama2_7b(cls) -> LlamaConfig:
        return cls()

    @classmethod
    def tulu2_7b(cls) -> LlamaConfig:
        """allenai/tulu-2-7b: Llama-2-7B fine-tuned; its config matches Llama-2-7B up to max length 8192."""
        return cls(max_position_embeddings=8192)

    @classmethod
    def tiny(cls, *, vocab_size: int = 128, num_kv_heads: int = 2, tie_word_embeddings: bool = False) -> LlamaConfig:
        return cls(vocab_size=vocab_size, max_position_embeddings=128, hidden_size=32, num_layers=2, num_heads=4,
                   num_kv_heads=num_kv_heads, intermediate_size=64, tie_word_embeddings=tie_word_embeddings)

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> LlamaConfig:
        mapped = {"vocab_size", "max_position_embeddings", "hidden_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "head_dim", "intermediate_size", "rms_norm_eps", "rope_theta",
                  "rope_parameters", "rope_scaling", "tie_word_embeddings"}
        ignored = {"attention_dropout", "pretraining_tp"}  # pretraining_tp only splits matmuls; same maths.
        fixed = {"hidden_act": "silu", "attention_bias": False, "mlp_bias": False}
        _check_fields(hf, mapped, ignored, fixed, "llama")
        rope = dict(hf.get("rope_parameters") or {})
        scaling = hf.get("rope_scaling")
        if scaling:
            rope.update(scaling)
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ConfigError(f"llama config.json asks for rope_type {rope_type!r} (rope_scaling/rope_parameters); "
                              "only 'default' RoPE is implemented")
        theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
        return cls(vocab_size=hf["vocab_size"], max_position_embeddings=hf.get("max_position_embeddings", 4096),
                   hidden_size=hf["hidden_size"], num_layers=hf["num_hidden_layers"],
                   num_heads=hf["num_attention_heads"],
                   num_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
                   head_dim=hf.get("head_dim"), intermediate_size=hf["intermediate_size"],
                   rms_norm_eps=hf.get("rms_norm_eps", 1e-6), rope_theta=float(theta),
                   tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)))

    def to_hf(self) -> dict[str, Any]:
        return {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": self.vocab_size,
                "max_position_embeddings": self.max_position_embeddings, "hidden_size": self.hidden_size,
                "num_hidden_layers": self.num_layers, "num_attention_heads": self.num_heads,
                "num_key_value_heads": self.num_kv_heads, "head_dim": self.dim_per_head,
                "intermediate_size": self.intermediate_size, "rms_norm_eps": self.rms_norm_eps,
                "rope_theta": self.rope_theta, "tie_word_embeddings": self.tie_word_embeddings,
                "hidden_act": "silu", "attention_bias": False, "mlp_bias": False}


ModelConfig = GPT2Config | LlamaConfig
CONFIG_CLASSES: dict[str, type] = {"gpt2": GPT2Config, "llama": LlamaConfig}


def config_from_hf(hf: dict[str, Any], *, source: str = "config.json") -> ModelConfig:
    model_type = hf.get("model_type")
    if model_type not in CONFIG_CLASSES:
        raise ConfigError(f"{source}: unknown model_type {model_type!r}; supported: {sorted(CONFIG_CLASSES)}")
    return CONFIG_CLASSES[model_type].from_hf(hf)
