"""Reward models with K heads (or K backbones), Bradley-Terry losses, and the EM mixture of reward models over
users, with the E-step's pure functions; the M-step's jitted internals stay in `maxmin_jax.rewards.em`."""

from maxmin_jax.rewards.bt import bt_loss, pair_log_likelihood, pairwise_accuracy
from maxmin_jax.rewards.em import (EMConfig, EMResult, MStepConfig, assign_user, clustering_metrics, e_step_hard,
                                   e_step_soft, evaluate_pairs, fit_em, fit_single_reward, log_likelihood_matrix,
                                   mixture_log_likelihood, user_log_likelihoods)
from maxmin_jax.rewards.fit import fit_rewards, load_reward_model, save_reward_model
from maxmin_jax.rewards.model import RewardModel, SeparateRewardModels, build_reward_model

__all__ = ["EMConfig", "EMResult", "MStepConfig", "RewardModel", "SeparateRewardModels", "assign_user", "bt_loss",
           "build_reward_model", "clustering_metrics", "e_step_hard", "e_step_soft", "evaluate_pairs", "fit_em",
           "fit_rewards", "fit_single_reward", "load_reward_model", "log_likelihood_matrix", "mixture_log_likelihood",
           "pair_log_likelihood", "pairwise_accuracy", "save_reward_model", "user_log_likelihoods"]
