"""Policy side of MaxMin-RLHF: social-choice objectives over group rewards and PPO math for causal LMs."""

from maxmin_jax.policy.objectives import (
    OBJECTIVES,
    Objective,
    ObjectiveState,
    RewardStandardizer,
    make_objective,
)
from maxmin_jax.policy.ppo import (
    AdaptiveKLController,
    FixedKLController,
    KLControllerState,
    PPOConfig,
    gae,
    kl_controller,
    kl_penalty,
    masked_entropy,
    masked_mean,
    policy_loss,
    token_logprobs,
    token_rewards,
    value_loss,
    whiten,
)

__all__ = [
    "OBJECTIVES",
    "AdaptiveKLController",
    "FixedKLController",
    "KLControllerState",
    "Objective",
    "ObjectiveState",
    "PPOConfig",
    "RewardStandardizer",
    "gae",
    "kl_controller",
    "kl_penalty",
    "make_objective",
    "masked_entropy",
    "masked_mean",
    "policy_loss",
    "token_logprobs",
    "token_rewards",
    "value_loss",
    "whiten",
]
