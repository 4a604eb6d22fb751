"""Policy side of MaxMin-RLHF: social-choice objectives over group rewards, advantage estimators (GAE and the
critic-free GRPO, Dr.GRPO, RLOO), PPO math for causal LMs, and offline preference losses (DPO, IPO) per group.
The trainers live in their modules: `policy.trainer` (PPO), `policy.critic_free`, `policy.offline`."""

from maxmin_jax.policy.advantages import (
    ESTIMATORS,
    Estimator,
    make_estimator,
    policy_gradient_loss,
)
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
    clipped_surrogate,
    gae,
    kl_controller,
    kl_penalty,
    masked_entropy,
    masked_mean,
    policy_loss,
    terminal_rewards,
    token_logprobs,
    token_rewards,
    value_loss,
    whiten,
)
from maxmin_jax.policy.preference import (
    PREFERENCE_LOSSES,
    aggregate_group_losses,
    dpo_loss,
    ipo_loss,
)

__all__ = [
    "ESTIMATORS",
    "OBJECTIVES",
    "PREFERENCE_LOSSES",
    "AdaptiveKLController",
    "Estimator",
    "FixedKLController",
    "KLControllerState",
    "Objective",
    "ObjectiveState",
    "PPOConfig",
    "RewardStandardizer",
    "aggregate_group_losses",
    "clipped_surrogate",
    "dpo_loss",
    "gae",
    "ipo_loss",
    "kl_controller",
    "kl_penalty",
    "make_estimator",
    "make_objective",
    "masked_entropy",
    "masked_mean",
    "policy_gradient_loss",
    "policy_loss",
    "terminal_rewards",
    "token_logprobs",
    "token_rewards",
    "value_loss",
    "whiten",
]
