"""The report of a run, assembled from the stages' results (`maxmin_jax.report` writes and plots it; the schema
is docs/report.md).

    groups, group_reward_kind, group_sizes        the groups rewards are reported for, and how
    group_heads                                   per group: could a reward head have protected it (held-out check)
    win_rates, comparisons, interval_kind, ...    every policy against every other (`maxmin_jax.evaluation`)
    em                                            ARI/purity, mixing weights, cluster names, EM history, held-out scores
    policies: {reference, NAME: {objective, algorithm, iterations, group_reward(_ci), worst_group_reward(_ci),
               best_worst_gap, gain_share, win_rate_vs_reference, win_rate_vs_single, learned_reward, kl, ...}}
    curves: {NAME: [per-iteration metrics]}, data, sft_loss, config, mesh, timing, devices

Rewards are on the reference-standardised scale (reference = 0, units of the reference's std). With a synthetic
world, `group_reward` is each true group's true reward; on real data it is each EM cluster's learned head."""

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

WIN_TRUE = ("true: the share of evaluation prompts on which each group's true reward prefers the policy's response "
            "(ties count half)")
WIN_LEARNED = ("learned: the share of evaluation prompts on which each EM cluster's learned reward head prefers the "
               "policy's response (ties count half); real data has no true group rewards")


def policy_summary(samples: dict, reference: dict, *, true_groups: list[str] | None, clusters: list[str]) -> dict:
    """Per-policy means: KL, length, the true groups' unstandardised rewards, and `learned_reward` of each mixture
    head (headK) and of the single reward ("single") on the reference-standardised scale. The group rewards and
    everything compared across policies come from `compare_policies`."""
    k = len(clusters)
    summary = summarize(samples, group_names=true_groups or [], reference=reference)
    heads = summary["learned_reward"]
    summary["learned_reward"] = {f"head{i}": heads[f"head{i}"] for i in range(k)}
    if f"head{k}" in heads:
        summary["learned_reward"]["single"] = heads[f"head{k}"]
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
    compared = compare_policies(ctx, {"reference": reference, **samples}, policies, groups,
                                learned=world is None, num_heads=rewards.num_groups)
    for name, fields in compared.pop("policies").items():
        entries[name].update(fields)
    report = {
        "groups": groups,
        "group_reward_kind": kind,
        "group_sizes": sizes,
        "group_heads": head_checks(ctx, prefs, rewards, groups, sizes),
        **compared,
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


def head_checks(ctx, prefs, rewards, groups: list[str], sizes: dict[str, int]) -> dict:
    """`group_heads`: whether each group had a reward head of its own that knows its preference, judged on the
    held-out pairs of its users (`maxmin_jax.evaluation.heads`)."""
    from maxmin_jax.evaluation.heads import group_heads

    heldout = prefs.heldout if prefs is not None else None
    pairs: dict[str, int] = {}
    if heldout is not None and heldout.groups is not None:
        pair_groups, counts = np.unique(np.asarray(heldout.groups, dtype=object)[heldout.user_index].astype(str),
                                        return_counts=True)
        pairs = dict(zip(pair_groups.tolist(), counts.tolist()))
    scores = (rewards.report.get("heldout") or {}).get("mixture")
    return group_heads(groups, heldout=scores, heldout_pairs=pairs, users=sizes,
                       cluster_groups=rewards.clusters if rewards.em is not None else None,
                       level=ctx.cfg.evaluation.confidence)


def compare_policies(ctx, samples: dict, policies, groups: list[str], *, learned: bool, num_heads: int) -> dict:
    """Intervals, worst group, gain shares, win rates and paired differences of every policy (`maxmin_jax.evaluation
    .compare`), on the true group rewards of a world, or on each EM head's learned reward on real data."""
    from maxmin_jax.evaluation.compare import COMPARISON_TEST, compare, single_baselines

    evaluation = ctx.cfg.evaluation
    scores = {name: s["learned_reward"][:, :num_heads] if learned else s["true_reward"] for name, s in samples.items()}
    result = compare(scores, groups, single=single_baselines({p.name: (p.objective, p.algorithm) for p in policies}),
                     resamples=evaluation.bootstrap_resamples, level=evaluation.confidence, seed=ctx.cfg.seed)
    reference = scores["reference"].astype(np.float64)
    correlation = np.corrcoef(reference.T) if reference.shape[1] > 1 and reference.std(0).min() > 0 else None
    return {"win_rate_kind": WIN_LEARNED if learned else WIN_TRUE, **result,
            "interval_kind": f"paired percentile bootstrap over the {reference.shape[0]} evaluation prompts, "
                             f"{evaluation.confidence:.0%}",
            "group_reward_correlation": correlation,
            "comparison_test": COMPARISON_TEST.format(level=evaluation.confidence)}


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
