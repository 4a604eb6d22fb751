"""Reward models with K heads, Bradley-Terry losses, and the EM mixture of reward models over users."""

from maxmin_jax.rewards.bt import bt_loss, pair_log_likelihood, pairwise_accuracy
from maxmin_jax.rewards.em import EMConfig, EMResult, fit_em, fit_single_reward, split_heldout
from maxmin_jax.rewards.estep import (e_step_hard, e_step_soft, log_likelihood_matrix, mixture_log_likelihood,
                                      pair_rewards, user_log_likelihoods)
from maxmin_jax.rewards.fit import fit_rewards, load_reward_model, save_reward_model, write_result
from maxmin_jax.rewards.fitted_oracle import fitted_oracle_ari, fitted_oracle_assignments
from maxmin_jax.rewards.model import (RewardModel, SeparateRewardModels, build_reward_model, last_token,
                                      score_pairs)
from maxmin_jax.rewards.mstep import MStepConfig, m_step
from maxmin_jax.rewards.scoring import assign_user, clustering_metrics, evaluate_pairs

__all__ = ["EMConfig", "EMResult", "MStepConfig", "RewardModel", "SeparateRewardModels", "assign_user", "bt_loss",
           "build_reward_model", "clustering_metrics", "e_step_hard", "e_step_soft", "evaluate_pairs", "fit_em",
           "fit_rewards", "fit_single_reward", "fitted_oracle_ari", "fitted_oracle_assignments", "last_token",
           "load_reward_model", "log_likelihood_matrix", "m_step", "mixture_log_likelihood", "pair_log_likelihood",
           "pair_rewards", "pairwise_accuracy", "save_reward_model", "score_pairs", "split_heldout",
           "user_log_likelihoods", "write_result"]
