"""Policy side of MaxMin-RLHF: social-choice objectives over group rewards, advantage estimators (GAE and the
critic-free GRPO, Dr.GRPO, RLOO), offline preference losses (DPO, IPO) per group, SFT, and the three jitted
trainers: PPO (`policy.trainer`), critic-free (`policy.critic_free`) and offline (`policy.offline`). The PPO math
(GAE, clipped losses, KL control) is `maxmin_jax.policy.ppo`."""

from maxmin_jax.policy.advantages import ESTIMATORS, Estimator, make_estimator, policy_gradient_loss
from maxmin_jax.policy.critic_free import CriticFreeConfig, CriticFreeState, CriticFreeTrainer
from maxmin_jax.policy.model import PolicyWithValue
from maxmin_jax.policy.objectives import OBJECTIVES, Objective, ObjectiveState, RewardStandardizer, make_objective
from maxmin_jax.policy.offline import (PreferenceConfig, PreferencePairs, PreferenceState, PreferenceTrainer,
                                       pair_group_weights, preference_pairs, with_reference_logprobs)
from maxmin_jax.policy.ppo import PPOConfig
from maxmin_jax.policy.preference import PREFERENCE_LOSSES, aggregate_group_losses, dpo_loss, ipo_loss
from maxmin_jax.policy.sft import SFTConfig, train_sft
from maxmin_jax.policy.trainer import PPOState, PPOTrainer

__all__ = ["ESTIMATORS", "OBJECTIVES", "PREFERENCE_LOSSES", "CriticFreeConfig", "CriticFreeState",
           "CriticFreeTrainer", "Estimator", "Objective", "ObjectiveState", "PPOConfig", "PPOState", "PPOTrainer",
           "PolicyWithValue", "PreferenceConfig", "PreferencePairs", "PreferenceState", "PreferenceTrainer",
           "RewardStandardizer", "SFTConfig", "aggregate_group_losses", "dpo_loss", "ipo_loss", "make_estimator",
           "make_objective", "pair_group_weights", "policy_gradient_loss", "preference_pairs", "train_sft",
           "with_reference_logprobs"]
