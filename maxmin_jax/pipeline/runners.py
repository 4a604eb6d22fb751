"""Runners as compositions of the shared stages: `run` (every stage, then the report), `fit_rewards` and
`train_policy` (the CLI commands of the same names).

Stages and their directories under the output directory:

    sft/                        the world's small GPT-2 (scratch models only)
    rewards/mixture/            EM mixture of K reward heads        rewards/single/   pooled single reward
    standardize/                each head's mean and std under the reference policy
    policy/OBJECTIVE/ALGORITHM/ checkpoints every N iterations      policies/NAME/    the exported policy
    evaluate/reference/, evaluate/OBJECTIVE/ALGORITHM/    samples.npz of the evaluation
    metrics.jsonl, tensorboard/, config.yaml, report.json, table.txt, *.png

Every stage's fingerprint is the part of the config its result depends on, with input files identified by their
content (`stage_plan`); all are checked against the directory's records before anything runs. The output
directory is held by one run at a time (`rundir.RunDir`).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import time
from pathlib import Path

import jax
from tqdm.auto import tqdm

from maxmin_jax.config_io import dump_yaml, to_dict
from maxmin_jax.errors import ConfigError
from maxmin_jax.generate import SamplingConfig
from maxmin_jax.metrics import MetricsWriter
from maxmin_jax.pipeline.config import (ALGORITHM_SETTINGS, OFFLINE, FitRewards, LoadRewards, RunConfig, ScratchModel,
                                        WorldPreferences)
from maxmin_jax.pipeline import outdir
from maxmin_jax.pipeline.provenance import Digests, identify_inputs
from maxmin_jax.pipeline.rundir import RunDir, Stage, is_primary
from maxmin_jax.pipeline.sources import (Stream, build_models, load_preference_pairs, prompt_source,
                                         read_preference_rows)

# Config keys that do not change any stage's result (progress bars, bookkeeping, placement).
NOT_FINGERPRINTED = ("seeds", "rewards.em.progress", "policy.objectives", "policy.algorithms",
                     "policy.iterations", "policy.checkpoint_every", "policy.export", "policy.softmin_temperature",
                     "policy.dro_step_size", "evaluation.examples", "evaluation.bootstrap_resamples",
                     "evaluation.confidence", "mesh", "tensorboard")


def _pick(config: dict, paths: list[str]) -> dict:
    """The nested subset of `config` at dotted `paths` (missing ones skipped)."""
    out: dict = {}
    for path in paths:
        node, parts = config, path.split(".")
        for part in parts:
            if not isinstance(node, dict) or part not in node:
                break
            node = node[part]
        else:
            target = out
            for part in parts[:-1]:
                target = target.setdefault(part, {})
            target[parts[-1]] = copy.deepcopy(node)
    return out


def stage_plan(cfg: RunConfig, *, stages: tuple[str, ...] = ("rewards", "standardize", "policy", "evaluate"),
               digests: Digests | None = None) -> dict[str, dict]:
    """{stage name: fingerprint} of every stage a runner doing `stages` goes through, in order. Input paths are
    replaced by digests of their content (`provenance.identify_inputs`; `digests` caches them)."""
    from maxmin_jax.pipeline.stages import objective_options

    config = identify_inputs(json.loads(json.dumps(to_dict(cfg))), digests)
    for path in NOT_FINGERPRINTED:
        *parents, last = path.split(".")
        node = config
        for part in parents:
            node = node.get(part) or {}
        if isinstance(node, dict):
            node.pop(last, None)
    data = ["seed", "model", "preferences", "prompt_template"]
    rewards = data + ["rewards", "lora.reward"]
    scored = rewards + ["prompts", "sampling", "lora.policy", "evaluation.batch_size"]
    plan = {}
    if isinstance(cfg.model, ScratchModel):
        plan["sft"] = _pick(config, ["seed", "model", "preferences"])
    if "rewards" in stages and isinstance(cfg.rewards, FitRewards):
        plan["rewards/mixture"] = _pick(config, rewards)
        if cfg.rewards.single_reward_steps:
            plan["rewards/single"] = _pick(config, rewards)
    if "standardize" in stages:
        plan["standardize"] = _pick(config, scored + ["evaluation.standardizer_prompts"])
    if "evaluate" in stages:
        plan["evaluate/reference"] = _pick(config, scored + ["evaluation.prompts"])
    if "policy" in stages:
        for objective, algorithm in cfg.policy.runs():
            # Another algorithm's settings do not change this policy.
            others = {k for a, keys in ALGORITHM_SETTINGS.items() if a != algorithm for k in keys}
            picked = _pick(config, scored + ["evaluation.standardizer_prompts", "policy"])
            picked["policy"] = {k: v for k, v in picked["policy"].items()
                                if k not in others - set(ALGORITHM_SETTINGS[algorithm])}
            policy = {**picked, "objective": objective, "algorithm": algorithm,
                      "objective_options": objective_options(objective, cfg.policy)}
            plan[f"policy/{objective}/{algorithm}"] = policy
            if "evaluate" in stages:
                plan[f"evaluate/{objective}/{algorithm}"] = {**policy, **_pick(config, ["evaluation"])}
    return plan


class Context:
    """What every stage reads: the config, the output directory and its stage plan, the mesh, the metrics stream,
    the sampling config (with the tokenizer's EOS and pad), the root key, progress reporting."""

    def __init__(self, cfg: RunConfig, out: str | Path, *, stages: tuple[str, ...], progress: bool = True,
                 overwrite: bool = False):
        self.cfg, self.progress = cfg, progress
        self.started = time.perf_counter()
        self.mesh = cfg.mesh.build() if cfg.mesh is not None else None  # first: a wrong mesh fails before loading
        self.plan = stage_plan(cfg, stages=stages)  # reads the inputs: a missing model fails before any output
        self.run = RunDir(out, overwrite=overwrite)
        try:
            self.run.check(self.plan)
            if is_primary():
                _write_text(self.run.root / "config.yaml", dump_yaml(cfg))
        except BaseException:
            self.run.close(failed=True)
            raise
        self.metrics = MetricsWriter(self.run.root, tensorboard=cfg.tensorboard, enabled=is_primary())
        self.sampling: SamplingConfig = cfg.sampling
        self.cache: dict = {}
        """What stages share within this process (the reference's log-probs of the preference pairs)."""

    def stage(self, name: str) -> Stage:
        return self.run.stage(name, self.plan[name])

    def key(self, stream: Stream) -> jax.Array:
        return jax.random.fold_in(jax.random.key(self.cfg.seed), int(stream))

    def log(self, message: str) -> None:
        if self.progress:
            tqdm.write(message)

    def use_tokenizer(self, tokenizer) -> None:
        """EOS (unless configured) and pad of the sampling config from the tokenizer."""
        eos = self.cfg.sampling.eos_token_id
        self.sampling = dataclasses.replace(self.cfg.sampling, pad_token_id=int(tokenizer.pad_token_id),
                                            eos_token_id=int(tokenizer.eos_token_id) if eos is None else eos)

    def stage_seconds(self) -> dict[str, float]:
        return {name: (self.stage(name).record or {}).get("seconds") for name in self.plan}

    def __enter__(self) -> Context:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.metrics.close()
        self.run.close(failed=exc_type is not None)


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


FIT_REWARDS_LAYOUT = ("assignments.json", "em_history.json", "em_history.png", "reward_model")
"""What fit-rewards publishes into its output directory."""


def _check(cfg: RunConfig, *, fit: bool, prompts: bool, out: str | Path | None = None) -> None:
    """What a runner needs from the config, refused before anything runs."""
    if isinstance(cfg.rewards, LoadRewards) and out is not None and Path(cfg.rewards.path).resolve() == \
            Path(out).resolve():
        raise ConfigError(f"rewards.path: {cfg.rewards.path} is also the output directory; the fitted rewards "
                          "would be written over: use another output directory", key="rewards.path")
    world = isinstance(cfg.preferences, WorldPreferences)
    if fit and isinstance(cfg.rewards, FitRewards):
        if cfg.preferences is None:
            raise ConfigError("preferences: required to fit reward models (or set rewards.source: load)")
        if "single" in cfg.policy.objectives and not cfg.rewards.single_reward_steps and prompts:
            raise ConfigError("policy.objectives: 'single' needs rewards.single_reward_steps > 0")
    if prompts and set(OFFLINE) & set(cfg.policy.algorithms) and cfg.preferences is None:
        raise ConfigError("policy.algorithms: dpo / ipo train on the run's preference pairs: set preferences")
    if prompts and cfg.prompts is None and not world:
        raise ConfigError("prompts: required unless preferences.source is 'world' (which supplies its own)")


def run(cfg: RunConfig, out: str | Path, *, progress: bool = True, overwrite: bool = False) -> dict:
    """Every stage, then the report (report.json, table.txt, plots) in `out`; returns the report. A rerun skips
    finished stages, resumes a half-finished one, and refuses a directory written under another config or other
    inputs (`overwrite`: empty it first)."""
    from maxmin_jax.pipeline.report import build_report
    from maxmin_jax.pipeline.stages import (evaluate, evaluated, reward_models, standardize, starting_policy,
                                            train_policy)
    from maxmin_jax.report import write_report

    if cfg.seeds is not None:  # one run per seed, then the aggregate report
        from maxmin_jax.pipeline.experiments import run_seeds

        return run_seeds(cfg, out, progress=progress, overwrite=overwrite)
    _check(cfg, fit=True, prompts=True, out=out)
    with Context(cfg, out, stages=("rewards", "standardize", "policy", "evaluate"), progress=progress,
                 overwrite=overwrite) as ctx:
        rows = read_preference_rows(cfg) if cfg.preferences is not None else None
        models = build_models(ctx)
        ctx.use_tokenizer(models.tokenizer)
        prefs = load_preference_pairs(ctx, models, rows) if rows is not None else None
        rewards = reward_models(ctx, models, prefs)
        prompts, prompt_info = prompt_source(ctx, models)
        standardizers = standardize(ctx, models, rewards, prompts)
        reference = evaluate(ctx, "evaluate/reference", starting_policy(ctx, models), models, rewards, prompts)
        policies, samples = [], {}
        for objective, algorithm in cfg.policy.runs():
            evaluation = ctx.stage(f"evaluate/{objective}/{algorithm}")
            trained = train_policy(ctx, objective, algorithm, models, rewards, standardizers, prompts, prefs=prefs,
                                   needed=not evaluated(evaluation, cfg.policy.iterations))
            samples[trained.name] = evaluate(ctx, evaluation.name, trained.lm, models, rewards, prompts,
                                             iterations=trained.iterations)
            policies.append(trained)
            ctx.log(f"{trained.name}: trained {trained.iterations} iterations")
        report = build_report(ctx, models, prefs, rewards, reference, policies, samples, prompt_info)
        if is_primary():
            write_report(report, out)
    return report


def fit_rewards(cfg: RunConfig, out: str | Path, *, progress: bool = True, overwrite: bool = False):
    """`maxmin-jax fit-rewards`: the reward stages only, then the fit-rewards layout in `out` (assignments.json,
    em_history.json, reward_model/, published together: a reader finds all or none), which `train_policy`
    (rewards.source: load) reads. Returns the EM result."""
    from maxmin_jax.pipeline.stages import reward_models
    from maxmin_jax.rewards.fit import write_result

    _check(cfg, fit=True, prompts=False, out=out)
    if not isinstance(cfg.rewards, FitRewards):
        raise ConfigError("rewards.source: fit-rewards fits reward models ('fit')")
    with Context(cfg, out, stages=("rewards",), progress=progress, overwrite=overwrite) as ctx:
        rows = read_preference_rows(cfg)
        models = build_models(ctx)
        prefs = load_preference_pairs(ctx, models, rows)
        rewards = reward_models(ctx, models, prefs)
        if is_primary():
            with outdir.publishing(out, FIT_REWARDS_LAYOUT) as staging:
                write_result(rewards.em, staging, config=cfg.rewards.em)
    return rewards.em, prefs


def train_policy(cfg: RunConfig, out: str | Path, *, progress: bool = True, overwrite: bool = False
                 ) -> dict[str, list[dict]]:
    """`maxmin-jax train-policy`: standardisation and policy training (with export) on loaded or fitted reward
    models, without evaluation. Returns each policy's curve."""
    from maxmin_jax.pipeline.stages import reward_models, standardize, train_policy as train

    _check(cfg, fit=True, prompts=True, out=out)
    with Context(cfg, out, stages=("rewards", "standardize", "policy"), progress=progress, overwrite=overwrite) as ctx:
        offline = bool(set(OFFLINE) & set(cfg.policy.algorithms))
        fit = cfg.preferences is not None and (offline or not isinstance(cfg.rewards, LoadRewards))
        rows = read_preference_rows(cfg) if fit else None
        models = build_models(ctx)
        ctx.use_tokenizer(models.tokenizer)
        prefs = load_preference_pairs(ctx, models, rows) if fit else None
        rewards = reward_models(ctx, models, prefs)
        prompts, _ = prompt_source(ctx, models)
        standardizers = standardize(ctx, models, rewards, prompts)
        curves = {}
        for objective, algorithm in cfg.policy.runs():
            trained = train(ctx, objective, algorithm, models, rewards, standardizers, prompts, prefs=prefs,
                            needed=False)
            curves[trained.name] = trained.curve
    return curves


__all__ = ["Context", "NOT_FINGERPRINTED", "fit_rewards", "run", "stage_plan", "train_policy"]
