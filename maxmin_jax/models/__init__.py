"""Flax NNX causal LMs that load Hugging Face checkpoints."""

from maxmin_jax.models.config import ConfigError, GPT2Config, LlamaConfig, ModelConfig, config_from_hf
from maxmin_jax.models.gpt2 import GPT2LMHeadModel
from maxmin_jax.models.llama import LlamaForCausalLM
from maxmin_jax.models.transformer import CausalLM

import jax.numpy as jnp
from flax import nnx

MODEL_CLASSES = {"gpt2": GPT2LMHeadModel, "llama": LlamaForCausalLM}


def build_model(config: ModelConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, **kwargs) -> CausalLM:
    """The module class for a config, freshly initialised (use `load_pretrained` for real weights)."""
    return MODEL_CLASSES[config.model_type](config, rngs=rngs, dtype=dtype, **kwargs)


__all__ = ["CausalLM", "ConfigError", "GPT2Config", "GPT2LMHeadModel", "LlamaConfig", "LlamaForCausalLM",
           "ModelConfig", "build_model", "config_from_hf"]
