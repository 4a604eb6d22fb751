"""Policy side of MaxMin-RLHF: social-choice objectives over group rewards, the policy with its value head, SFT,
and the jitted PPO trainer. The PPO math (GAE, clipped losses, KL control) is `maxmin_jax.policy.ppo`."""

from maxmin_jax.policy.model import PolicyWithValue
from maxmin_jax.policy.objectives import OBJECTIVES, Objective, ObjectiveState, RewardStandardizer, make_objective
from maxmin_jax.policy.ppo import PPOConfig
from maxmin_jax.policy.sft import SFTConfig, train_sft
from maxmin_jax.policy.trainer import PPOState, PPOTrainer

__all__ = ["OBJECTIVES", "Objective", "ObjectiveState", "PPOConfig", "PPOState", "PPOTrainer", "PolicyWithValue",
           "RewardStandardizer", "SFTConfig", "make_objective", "train_sft"]
