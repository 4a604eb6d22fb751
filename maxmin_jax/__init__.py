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

from maxmin_jax.checkpoint import CheckpointManager
from maxmin_jax.errors import ConfigError, InputError
from maxmin_jax.generate import SamplingConfig, generate
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

__version__ = "0.1.0"

__all__ = ["CheckpointError", "CheckpointManager", "ConfigError", "EMConfig", "GPT2Config", "GPT2LMHeadModel",
           "InputError", "LlamaConfig", "LlamaForCausalLM", "MStepConfig", "PPOConfig", "PPOTrainer",
           "PolicyWithValue", "RewardModel", "RewardStandardizer", "RunConfig", "SamplingConfig", "build_model",
           "fit_em", "fit_single_reward", "generate", "load_config", "load_pretrained", "make_mesh", "make_objective",
           "run", "save_pretrained", "trainable_filter"]
