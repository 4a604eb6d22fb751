"""maxmin-jax: MaxMin-RLHF in JAX. Mixtures of reward models learned by EM over users, and policy optimisation
for the worst-off preference group, on Flax NNX GPT-2 / Llama models that load Hugging Face weights.

    import maxmin_jax as mm
    model = mm.load_pretrained("gpt2", mesh=mm.make_mesh(data=2, fsdp=4))
    report = mm.run(mm.load_config("configs/gpt2_imdb.yaml"), "out/gpt2_imdb")   # the whole pipeline

The pieces: `load_pretrained`/`save_pretrained`, `generate` with a `SamplingConfig`; `fit_em` and
`fit_single_reward` on a `RewardModel`; `make_objective`, `PPOTrainer` with `PPOConfig` on a `PolicyWithValue`;
`trainable_filter` (what every trainer trains); `make_mesh`; `CheckpointManager`; and the pipeline's `RunConfig`,
`load_config`, `run`. Subpackages (`models`, `data`, `rewards`, `policy`, `pipeline`) hold the rest.
"""

import importlib
from typing import TYPE_CHECKING

# Eager: the function shares its module's name, and importing the module `maxmin_jax.generate` anywhere would
# otherwise leave the module, not the function, as `maxmin_jax.generate`.
from maxmin_jax.generate import SamplingConfig, generate

# Where each public name lives. Imported on first use (PEP 562), so `import maxmin_jax` and the CLI's start do not
# pay for orbax, transformers and datasets until a command needs them.
_EXPORTS = {
    "CheckpointManager": "maxmin_jax.checkpoint",
    "ConfigError": "maxmin_jax.errors", "InputError": "maxmin_jax.errors",
    "GPT2Config": "maxmin_jax.models", "GPT2LMHeadModel": "maxmin_jax.models", "LlamaConfig": "maxmin_jax.models",
    "LlamaForCausalLM": "maxmin_jax.models", "build_model": "maxmin_jax.models",
    "CheckpointError": "maxmin_jax.models.hf", "load_pretrained": "maxmin_jax.models.hf",
    "save_pretrained": "maxmin_jax.models.hf",
    "RunConfig": "maxmin_jax.pipeline", "load_config": "maxmin_jax.pipeline", "run": "maxmin_jax.pipeline",
    "PolicyWithValue": "maxmin_jax.policy.model",
    "RewardStandardizer": "maxmin_jax.policy.objectives", "make_objective": "maxmin_jax.policy.objectives",
    "PPOConfig": "maxmin_jax.policy.ppo",
    "PPOTrainer": "maxmin_jax.policy.trainer",
    "EMConfig": "maxmin_jax.rewards.em", "MStepConfig": "maxmin_jax.rewards.em", "fit_em": "maxmin_jax.rewards.em",
    "fit_single_reward": "maxmin_jax.rewards.em",
    "RewardModel": "maxmin_jax.rewards.model",
    "make_mesh": "maxmin_jax.sharding",
    "trainable_filter": "maxmin_jax.trainable",
}

if TYPE_CHECKING:  # the same names, eagerly, for type checkers and IDEs
    from maxmin_jax.checkpoint import CheckpointManager
    from maxmin_jax.errors import ConfigError, InputError
    from maxmin_jax.models import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, build_model
    from maxmin_jax.models.hf import CheckpointError, load_pretrained, save_pretrained
    from maxmin_jax.pipeline import RunConfig, load_config, run
    from maxmin_jax.policy.model import PolicyWithValue
    from maxmin_jax.policy.objectives import RewardStandardizer, make_objective
    from maxmin_jax.policy.ppo import PPOConfig
    from maxmin_jax.policy.trainer import PPOTrainer
    from maxmin_jax.rewards.em import EMConfig, MStepConfig, fit_em, fit_single_reward
    from maxmin_jax.rewards.model import RewardModel
    from maxmin_jax.sharding import make_mesh
    from maxmin_jax.trainable import trainable_filter


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'maxmin_jax' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))


__version__ = "0.1.0"

__all__ = ["CheckpointError", "CheckpointManager", "ConfigError", "EMConfig", "GPT2Config", "GPT2LMHeadModel",
           "InputError", "LlamaConfig", "LlamaForCausalLM", "MStepConfig", "PPOConfig", "PPOTrainer",
           "PolicyWithValue", "RewardModel", "RewardStandardizer", "RunConfig", "SamplingConfig", "build_model",
           "fit_em", "fit_single_reward", "generate", "load_config", "load_pretrained", "make_mesh", "make_objective",
           "run", "save_pretrained", "trainable_filter"]
