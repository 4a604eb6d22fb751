"""maxmin-jax: MaxMin-RLHF in JAX. Mixtures of reward models learned by EM over users, and policy optimisation
for the worst-off preference group, on Flax NNX GPT-2 / Llama models that load Hugging Face weights."""

from maxmin_jax.generate import generate
from maxmin_jax.models import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, build_model
from maxmin_jax.models.hf import CheckpointError, load_pretrained, save_pretrained
from maxmin_jax.sharding import make_mesh

__version__ = "0.1.0"

__all__ = ["CheckpointError", "GPT2Config", "GPT2LMHeadModel", "LlamaConfig", "LlamaForCausalLM", "build_model",
           "generate", "load_pretrained", "make_mesh", "save_pretrained"]
