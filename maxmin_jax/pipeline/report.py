"""The report of a run, assembled from the stages' results (`maxmin_jax.report` writes and plots it).

    groups, group_reward_kind, group_sizes        the groups rewards are reported for, and how
    em                                            ARI/purity, mixing weights, cluster names, EM history, held-out scores
    policies: {reference, NAME: {objective, algorithm, iterations, group_reward, worst_group_reward,
               learned_reward, kl, response_length, examples}}
    curves: {NAME: [per-iteration metrics]}, data, sft_loss, config, mesh, timing, devices

Rewards are on the reference-standardised scale (reference = 0, units of the reference's std). With a synthetic
world, `group_reward` is each true group's true reward; on real data it is each EM cluster's learned head.
"""

from __future__ import annotations

import time

import jax
import numpy as np

from maxmin_jax.config_io import to_dict
from maxmin_jax.eval import summarize
from maxmin_jax.pipeline.config import FilePreferences, PSoupsPreferences

TRUE_KIND = ("true: mean true reward of each group of the world, standardised by the reference policy's mean and "
             "std (reference = 0)")
LEARNED_KIND = ("learned: mean reward of each EM cluster's head, standardised by the reference policy's mean and "
                "std (reference = 0); real data has no true group rewards")


def policy_summary(samples: dict, reference: dict, *, true_groups: list[str] | None, clusters: list[str]) -> dict:
    """Per-policy means on the reference-standardised scale: `learned_reward` of each mixture head (headK) and of
    the single reward ("single"), and `group_reward`: the true groups' rewards, or each cluster's head by name."""
    k = len(clusters)
    summary = summarize(samples, group_names=true_groups or [], reference=reference)
    heads = summary["learned_reward"]
    summary["learned_reward"] = {f"head{i}": heads[f"head{i}"] for i in range(k)}
    if f"head{k}" in heads:
        summary["learned_reward"]["single"] = heads[f"head{k}"]
    if true_groups is None:
        summary["group_reward"] = {name: heads[f"head{i}"] for i, name in enumerate(clusters)}
        summary["worst_group_reward"] = min(summary["group_reward"].values())
    return summary


def build_report(ctx, models, prefs, rewards, reference: dict, policies, samples: dict, prompt_info: dict) -> dict:
    cfg = ctx.cfg
    world = models.world
    if world is not None:
        groups, kind = list(world.group_names), TRUE_KIND
        sizes = dict(zip(groups, (int(s) for s in world.group_sizes)))
    else:
        groups, kind = list(rewards.clusters), LEARNED_KIND
        assignments = rewards.em.assignments if rewards.em is not None else np.zeros(0, int)
        sizes = dict(zip(groups, np.bincount(assignments, minlength=len(groups)).tolist()))
    summary = lambda s: policy_summary(s, reference, true_groups=groups if world is not None else None,  # noqa
                                       clusters=rewards.clusters)
    entries = {"reference": summary(reference)}
    for trained in policies:
        result = samples[trained.name]
        entries[trained.name] = {"objective": trained.objective, "algorithm": trained.algorithm,
                                 "iterations": trained.iterations, **summary(result),
                                 "examples": models.tokenizer.batch_decode(result["tokens"][:cfg.evaluation.examples],
                                                                           skip_special_tokens=True)}
    report = {
        "groups": groups,
        "group_reward_kind": kind,
        "group_sizes": sizes,
        "em": {**rewards.report, **({"pairs": prefs.info["pairs"]} if prefs is not None else {})},
        "policies": entries,
        "curves": {trained.name: trained.curve for trained in policies},
        "data": {**(prefs.info if prefs is not None else {}), **prompt_info},
    }
    if isinstance(cfg.preferences, (FilePreferences, PSoupsPreferences)) and prefs.train.groups is not None:
        file_groups = sorted(set(prefs.train.groups))
        report["file_groups"] = file_groups
        report["file_group_sizes"] = {g: list(prefs.train.groups).count(g) for g in file_groups}
    if "sft_loss" in models.info:
        report["sft_loss"] = models.info["sft_loss"]
    report.update({
        "config": to_dict(cfg),
        "mesh": dict(ctx.mesh.shape) if ctx.mesh is not None else None,
        "timing": {"seconds": time.perf_counter() - ctx.started, "stages": ctx.stage_seconds()},
        "devices": [str(d) for d in jax.devices()],
    })
    return to_python(report)


def to_python(tree):
    """numpy and jax values as Python scalars and lists, for JSON (mappings keep their order)."""
    if isinstance(tree, dict):
        return {k: to_python(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [to_python(v) for v in tree]
    if isinstance(tree, (np.ndarray, jax.Array)):
        tree = np.asarray(tree)
        return tree.item() if tree.ndim == 0 else tree.tolist()
    if isinstance(tree, np.generic):
        return tree.item()
    return tree


__all__ = ["LEARNED_KIND", "TRUE_KIND", "build_report", "policy_summary", "to_python"]
