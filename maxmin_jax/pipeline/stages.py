"""The stages every runner shares: reward models -> standardisation -> policy training -> evaluation.

Each stage is a function of a run context (`maxmin_jax.pipeline.runners.Context`: config, output directory, mesh,
metrics stream) and the results of earlier stages. A finished stage is read back from its record instead of being
recomputed; `iterate` is the one policy-training loop, with checkpoints every N iterations and exact resume.
"""

from __future__ import annotations

import dataclasses
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from maxmin_jax import strict_json
from maxmin_jax.errors import CheckpointError, ConfigError, NumericalFault, RunDirError
from maxmin_jax.eval import evaluate_policy
from maxmin_jax.guards import check_fit_history, first_fault, without_flags
from maxmin_jax.models.transformer import CausalLM
from maxmin_jax.pipeline import outdir
from maxmin_jax.pipeline.config import ALGORITHM_SETTINGS, LoadRewards, LoraSpec, PolicyConfig
from maxmin_jax.pipeline.rundir import Stage, decode_arrays, encode_arrays, is_primary
from maxmin_jax.pipeline.sources import Models, Preferences, PromptSource, Stream
from maxmin_jax.policy.model import PolicyWithValue
from maxmin_jax.policy.objectives import RewardStandardizer
from maxmin_jax.policy.training import check_step
from maxmin_jax.rewards.diagnostics import fit_warnings
from maxmin_jax.rewards.em import EMResult, fit_em, fit_single_reward
from maxmin_jax.rewards.scoring import clustering_metrics, evaluate_pairs
from maxmin_jax.trainable import trainable_filter


def _lora(ctx, which: str) -> LoraSpec | None:
    return getattr(ctx.cfg.lora, which) if ctx.cfg.lora is not None else None


def _adapted(ctx, backbone: CausalLM, lora: LoraSpec | None, seed: int) -> CausalLM:
    """A view of `backbone` (its arrays are shared, not copied), with fresh adapters under LoRA."""
    lm = nnx.clone(backbone)
    if lora is not None:
        from maxmin_jax.models.lora import add_lora

        add_lora(lm, rank=lora.rank, alpha=lora.alpha, targets=lora.targets, rngs=nnx.Rngs(seed), mesh=ctx.mesh)
    return lm


def _placed(ctx, module):
    if ctx.mesh is None:
        return module
    from maxmin_jax.sharding import shard_module

    return shard_module(module, ctx.mesh)


# Rewards ------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Rewards:
    """The fitted (or loaded) reward models and what the report says about them."""

    mixture: nnx.Module
    weights: np.ndarray
    """EM mixing weights (the `utilitarian` objective's weights)."""
    single: nnx.Module | None
    clusters: list[str]
    """A name for each mixture head: the known group most of its users come from, else clusterK."""
    report: dict
    em: EMResult | None = None
    membership: tuple[tuple[str, ...], np.ndarray] | None = None
    """(user ids, [U, K] responsibilities) of the EM fit: the groups of the offline algorithms' pairs."""

    @property
    def num_groups(self) -> int:
        return int(self.mixture.num_groups)

    def for_objective(self, objective: str) -> tuple[nnx.Module, str]:
        """The reward model an objective optimises and the name of its standardiser."""
        if objective != "single":
            return self.mixture, "mixture"
        if self.single is None:
            raise ConfigError("policy.objectives: 'single' needs the pooled single reward (rewards.single_reward_steps "
                              "> 0, or a K=1 reward model to load)")
        return self.single, "single"


def cluster_names(assignments: np.ndarray, user_groups, num_clusters: int) -> list[str]:
    """Each cluster named after the known group most of its users come from (unique; clusterK when unknown)."""
    names = []
    for c in range(num_clusters):
        members = [g for a, g in zip(assignments, user_groups or ()) if a == c]
        name = Counter(members).most_common(1)[0][0] if members else f"cluster{c}"
        names.append(name if name not in names else f"{name}#{c}")
    return names


def _reward_model(ctx, backbone: CausalLM, num_groups: int, seed: int) -> nnx.Module:
    from maxmin_jax.rewards.model import build_reward_model

    lm = _adapted(ctx, backbone, _lora(ctx, "reward"), seed)
    return _placed(ctx, build_reward_model(lm, num_groups, shared_backbone=ctx.cfg.rewards.shared_backbone,
                                           rngs=nnx.Rngs(seed)))


def _em_fields(result: EMResult) -> dict:
    return encode_arrays({f.name: getattr(result, f.name) for f in dataclasses.fields(EMResult) if f.name != "model"})


def _em_result(fields: dict, model: nnx.Module) -> EMResult:
    fields = decode_arrays(fields)
    fields["user_ids"] = tuple(fields["user_ids"])
    return EMResult(model=model, **fields)


def _fit_stage(ctx, stage: Stage, model: nnx.Module, fit: Callable[[], EMResult], prefs: Preferences, *,
               m_steps: int) -> tuple[EMResult, dict | None]:
    """Fit `model` with `fit` (or read it back): the EM result and its held-out scores. A fit that did not train
    (every M-step rejected, or a non-finite number: `guards.check_fit_history`) stops the run before anything of
    it is saved. The result's model is the fitted one (`model`, or with num_groups="auto" the same backbone
    with the chosen K heads)."""
    trainable = trainable_filter(lora=_lora(ctx, "reward") is not None)
    if stage.done:
        nnx.update(model, stage.restore_state(nnx.state(model, trainable)))
        return _em_result(stage.result["em"], model), stage.result["heldout"]
    stage.start()
    result = fit()
    model = result.model
    for row in result.history:
        ctx.metrics.write(stage.name, row["round"], {k: v for k, v in row.items()  # numbers only, not who assigned
                                                     if k != "round" and v is not None and not isinstance(v, str)})
    check_fit_history(result.history, where=stage.name, m_steps=m_steps,
                      learning_rate="rewards.em.m_step.learning_rate")
    for name in ("weights", "responsibilities"):
        value = np.asarray(getattr(result, name), np.float64)
        if not np.all(np.isfinite(value)):
            raise NumericalFault(f"{stage.name}: the fitted {name} are not finite; nothing is written",
                                 quantity=name, value=value)
    if prefs.train.groups is not None and result.weights.shape[0] > 1:
        result.metrics.update(clustering_metrics(result.assignments, prefs.train.groups))
    heldout = (evaluate_pairs(result, prefs.heldout, chunk_size=ctx.cfg.rewards.em.chunk_size)
               if prefs.heldout is not None else None)
    stage.save_state(nnx.state(model, trainable))
    recorded = stage.finish({"em": _em_fields(result), "heldout": heldout})
    return _em_result(recorded["em"], model), recorded["heldout"]


def reward_models(ctx, models: Models, prefs: Preferences | None) -> Rewards:
    """Stages `rewards/mixture` and `rewards/single`: EM over users for K reward heads, and the pooled single
    reward (the standard-RLHF baseline), on the reward backbone (with LoRA adapters when configured)."""
    source = ctx.cfg.rewards
    if isinstance(source, LoadRewards):
        return load_rewards(ctx, source)
    if prefs is None:
        raise ConfigError("preferences: required to fit reward models (or set rewards.source: load)")
    em_cfg = dataclasses.replace(source.em, progress=ctx.progress)
    trainable = trainable_filter(lora=_lora(ctx, "reward") is not None)
    stage = ctx.stage("rewards/mixture")
    k = source.em.num_groups
    if k == "auto":  # fit_em gives the backbone the chosen K's heads; a finished stage recorded K
        k = int(stage.result["em"]["num_groups"]) if stage.done else 1
    mixture = _reward_model(ctx, models.reward, k, ctx.cfg.seed + 1)
    em, heldout_mixture = _fit_stage(
        ctx, stage, mixture, lambda: fit_em(mixture, prefs.train, em_cfg, mesh=ctx.mesh, trainable=trainable), prefs,
        m_steps=source.em.steps_per_round)
    mixture = em.model
    heldout = {"mixture": heldout_mixture}
    single = single_fit = None
    if source.single_reward_steps:
        single = _reward_model(ctx, models.reward, 1, ctx.cfg.seed + 2)
        single_fit, heldout["single"] = _fit_stage(
            ctx, ctx.stage("rewards/single"), single,
            lambda: fit_single_reward(single, prefs.train, steps=source.single_reward_steps,
                                      batch_size=source.em.batch_size, m_step_config=source.em.m_step,
                                      seed=ctx.cfg.seed, progress=ctx.progress, trainable=trainable), prefs,
            m_steps=source.single_reward_steps)
    groups = prefs.train.groups
    clusters = cluster_names(em.assignments, groups, em.weights.shape[0])
    clustering = ({k: em.metrics.get(k) for k in ("ari", "purity")} if groups is not None
                  else {"ari": None, "purity": None})
    report = {**clustering, "weights": em.weights.tolist(), "cluster_groups": clusters, "history": em.history,
              "heldout": heldout if prefs.heldout is not None else None, "users": prefs.train.num_users,
              "single_reward_history": single_fit.history if single_fit is not None else None}
    report["num_groups"], report["warnings"] = em.num_groups, fit_warnings(em)
    ctx.log(f"EM: ARI {clustering['ari']}, weights {np.round(em.weights, 3).tolist()}, clusters {clusters}")
    for message in report["warnings"]:
        ctx.log(f"EM warning: {message}")
    return Rewards(mixture, em.weights, single, clusters, report, em, (em.user_ids, em.responsibilities))


def load_rewards(ctx, source: LoadRewards) -> Rewards:
    """Reward models written by `fit-rewards`; a K=1 model also serves the `single` objective."""
    from maxmin_jax.rewards.fit import load_reward_model

    path = Path(source.path)
    if outdir.incomplete(path):
        raise CheckpointError(f"{path}: the fit-rewards run that wrote it was stopped while publishing its results; "
                              "run the same fit-rewards command again to complete them", path=path)
    history_path = path / "em_history.json"
    if not history_path.exists():
        raise ConfigError(f"rewards.path: {path} is not a fit-rewards directory (no em_history.json)")
    try:
        history = strict_json.read_json(history_path)
    except ValueError as err:  # NaN tokens (an older fit that diverged) or a damaged file
        raise CheckpointError(f"{err}; fit the rewards again", path=history_path) from None
    try:
        check_fit_history(history["history"], where=str(history_path),
                          m_steps=(history.get("config") or {}).get("steps_per_round", 1))
    except NumericalFault as err:
        raise CheckpointError(f"{path}: this reward model did not train ({err}); fit it again", path=path) from None
    model = load_reward_model(path / "reward_model", mesh=ctx.mesh)
    weights = np.asarray(history["weights"], np.float32)
    clusters = [f"cluster{k}" for k in range(model.num_groups)]
    report = {"ari": history.get("metrics", {}).get("ari"), "weights": weights.tolist(), "cluster_groups": clusters,
              "history": history["history"], "loaded_from": str(path)}
    membership = None
    if isinstance(history.get("responsibilities"), dict):
        users = tuple(history["responsibilities"])
        membership = (users, np.asarray([history["responsibilities"][u] for u in users], np.float32))
    return Rewards(model, weights, model if model.num_groups == 1 else None, clusters, report, membership=membership)


class Scorers(nnx.Module):
    """The mixture's K heads and, beside them, the single reward: [B, K (+ 1)] in one forward pass of each."""

    def __init__(self, mixture: nnx.Module, single: nnx.Module | None):
        self.mixture, self.single = mixture, single

    def __call__(self, input_ids, attention_mask=None):
        rewards = self.mixture(input_ids, attention_mask)
        if self.single is None:
            return rewards
        return jnp.concatenate([rewards, self.single(input_ids, attention_mask)], -1)


def scorers(rewards: Rewards) -> Scorers:
    return Scorers(rewards.mixture, rewards.single if rewards.single is not rewards.mixture else None)


# Standardisation ----------------------------------------------------------------------------------------------------
def starting_policy(ctx, models: Models) -> CausalLM:
    """Every policy's start, and the reference evaluated through the same program: a view of the base weights, with
    fresh adapters under LoRA (B = 0, so it computes exactly what the base does)."""
    return _adapted(ctx, models.policy, _lora(ctx, "policy"), ctx.cfg.seed + 3)


def standardize(ctx, models: Models, rewards: Rewards, prompts: PromptSource) -> dict[str, RewardStandardizer]:
    """Stage `standardize`: each reward head's mean and std on the reference policy's samples, so 0 is the
    reference's utility for every group and 1 one reference standard deviation."""
    stage = ctx.stage("standardize")
    recorded = stage.result if stage.done else None
    if recorded is None:
        stage.start()
        n = ctx.cfg.evaluation.standardizer_prompts
        # With the true rewards too (unused here): the same program as every evaluation, compiled once.
        samples = evaluate_policy(starting_policy(ctx, models), models.policy, scorers(rewards),
                                  *prompts.sample(n, Stream.STANDARDIZE), sampling=ctx.sampling,
                                  key=ctx.key(Stream.STANDARDIZE), batch_size=ctx.cfg.evaluation.batch_size,
                                  true_reward_fn=models.true_reward_fn)
        k, learned = rewards.num_groups, samples["learned_reward"]
        fitted = {"mixture": RewardStandardizer.fit(learned[:, :k])}
        fitted["single"] = RewardStandardizer.fit(learned[:, k:]) if learned.shape[1] > k else fitted["mixture"]
        recorded = stage.finish({name: {"mean": np.asarray(s.mean).tolist(), "std": np.asarray(s.std).tolist()}
                                 for name, s in fitted.items()})
    # Always from the record's numbers: a run that read them back uses exactly what one that fitted them does.
    return {name: RewardStandardizer(jnp.asarray(s["mean"], jnp.float32), jnp.asarray(s["std"], jnp.float32))
            for name, s in recorded.items()}


# Policy training ----------------------------------------------------------------------------------------------------
def objective_options(objective: str, policy: PolicyConfig) -> dict[str, Any]:
    """The configured arguments of an objective (utilitarian's weights come from the fitted mixture)."""
    return {"softmin": {"temperature": policy.softmin_temperature},
            "dro": {"step_size": policy.dro_step_size}}.get(objective, {})


def iterate(ctx, stage: Stage, trainer, batch: Callable[[int], tuple], *, iterations: int, checkpoint_every: int,
            group_names: list[str] | None = None, learning_rate: str = "policy.ppo.learning_rate"
            ) -> tuple[Any, list[dict]]:
    """The training loop of every policy: `trainer.step(state, *batch(i), key_i)` for i < iterations, with the
    metrics of each iteration streamed and the full state checkpointed every `checkpoint_every` iterations.
    Resumes from the stage's last checkpoint; iteration i's batch and key depend on i only, so a resumed run ends
    exactly where an uninterrupted one does. Returns the final state and every iteration's metrics record.

    An iteration whose metrics raise a fault flag (`maxmin_jax.guards`: a non-finite or exploding loss, gradient
    norm or KL) is recorded and stops the run with `NumericalFault` before it is checkpointed, so the last
    checkpoint stays the last good state; `learning_rate` is the option its hint names."""
    with stage.checkpoints() as checkpoints:
        state = trainer.init_state()
        restored = checkpoints.restore_latest(state)
        start = 0 if restored is None else int(restored.step)
        state = state if restored is None else restored
        if start > iterations:
            raise RunDirError(f"{stage.path} holds {start} iterations but policy.iterations is {iterations}; "
                              "use another output directory to train fewer")
        records = ctx.metrics.resume(stage.name, start)
        if start < iterations:
            stage.start()
            if start:
                ctx.log(f"{stage.name}: resumed from iteration {start}")
        key = ctx.key(Stream.TRAIN)
        for it in tqdm(range(start, iterations), desc=stage.name, disable=not ctx.progress, leave=False):
            began = time.perf_counter()
            inputs = batch(it)
            state, metrics = trainer.step(state, *inputs, jax.random.fold_in(key, it))
            metrics = jax.device_get(metrics)  # waits for the iteration: the time below is its wall time
            seconds = time.perf_counter() - began
            throughput = {"seconds": seconds}
            if "sampled_tokens" in metrics:  # online
                throughput["tokens_per_second"] = float(metrics["sampled_tokens"]) / seconds
            else:  # offline: a batch of preference pairs
                throughput["pairs_per_second"] = inputs[0].num_pairs / seconds
            records.append(ctx.metrics.write(stage.name, it + 1, {**without_flags(metrics), **throughput},
                                             group_names=group_names))
            if first_fault(metrics) is not None:
                checkpoints.wait_until_finished()
                check_step(metrics, where=stage.name, step=it + 1, last_good_step=checkpoints.latest_step(),
                           checkpoints=str(checkpoints.directory), learning_rate=learning_rate)
            if (it + 1) % checkpoint_every == 0 or it + 1 == iterations:
                checkpoints.save(it + 1, state)
        checkpoints.wait_until_finished()
    return state, records


TIMING_KEYS = ("stage", "step", "time", "seconds", "tokens_per_second", "pairs_per_second")
"""Fields of a metrics record that describe the run, not the training (left out of the report's curves)."""


@dataclasses.dataclass
class TrainedPolicy:
    name: str
    objective: str
    algorithm: str
    iterations: int
    curve: list[dict]
    lm: CausalLM | None
    """The trained policy's LM (None when its evaluation and export were already done)."""


def train_policy(ctx, objective: str, algorithm: str, models: Models, rewards: Rewards,
                 standardizers: dict[str, RewardStandardizer], prompts: PromptSource, *,
                 prefs: Preferences | None = None, needed: bool = True) -> TrainedPolicy:
    """Stage `policy/OBJECTIVE/ALGORITHM`: train one policy from the common start (and export it), online on
    `prompts` or offline on `prefs`' pairs. A finished stage is not touched unless `needed` (its policy is still
    to be evaluated or exported)."""
    cfg = ctx.cfg.policy
    name = cfg.name(objective, algorithm)
    stage = ctx.stage(f"policy/{objective}/{algorithm}")
    finished = stage.done and stage.result["iterations"] == cfg.iterations
    if finished and not needed:
        curve = ctx.metrics.records(stage.name)[:cfg.iterations]
        return TrainedPolicy(name, objective, algorithm, cfg.iterations, _curve(curve), None)
    from maxmin_jax.pipeline.algorithms import make_trainer

    trainer, batch = make_trainer(ctx, objective, algorithm, models, rewards, standardizers, prompts, prefs)
    state, records = iterate(ctx, stage, trainer, batch, iterations=cfg.iterations,
                             checkpoint_every=cfg.checkpoint_every,
                             group_names=rewards.clusters if objective != "single" else ["single"],
                             learning_rate=f"policy.{ALGORITHM_SETTINGS[algorithm][0]}.learning_rate")
    policy = trainer.policy(state)
    lm = policy.lm if isinstance(policy, PolicyWithValue) else policy
    if not finished:
        if cfg.export:
            export_policy(ctx, lm, state.trainable, models, ctx.run.root / "policies" / name)
        stage.finish({"iterations": cfg.iterations})
    return TrainedPolicy(name, objective, algorithm, cfg.iterations, _curve(records), lm)


def _curve(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records]


def export_policy(ctx, lm: CausalLM, trainable: nnx.State, models: Models, directory: Path) -> None:
    """Full fine-tuning: the policy's LM as an HF checkpoint with its tokenizer (loadable with `load_pretrained`).
    LoRA: the trained adapters (and PPO's value head) as float32 npz (keys are state paths) and
    adapter_config.json."""
    if not is_primary():
        return
    with outdir.publishing(directory.parent) as staging:  # appears whole, or not at all
        _write_policy(ctx, lm, trainable, models, staging / directory.name)


def _write_policy(ctx, lm: CausalLM, trainable: nnx.State, models: Models, directory: Path) -> None:
    directory.mkdir(parents=True)
    lora = _lora(ctx, "policy")
    base = getattr(ctx.cfg.model, "policy", "sft")
    if lora is None:
        from maxmin_jax.models.hf import save_pretrained

        save_pretrained(lm, directory)
        models.tokenizer.save_pretrained(directory)
        return
    arrays = {"/".join(map(str, path)): np.asarray(jax.device_get(var.get_value()), dtype=np.float32)
              for path, var in nnx.to_flat_state(trainable)}
    np.savez(directory / "trainable.npz", **arrays)
    strict_json.write_json(directory / "adapter_config.json",
                           {"base_model": base, "rank": lora.rank, "alpha": lora.alpha, "targets": lora.targets,
                            "arrays": sorted(arrays)})


# Evaluation ---------------------------------------------------------------------------------------------------------
def evaluated(stage: Stage, iterations: int | None) -> bool:
    """Whether an evaluation stage holds the samples of the policy after `iterations` (None: the reference)."""
    return stage.done and stage.result.get("iterations") == iterations


def evaluate(ctx, stage_name: str, lm: CausalLM | None, models: Models, rewards: Rewards, prompts: PromptSource, *,
             iterations: int | None = None) -> dict[str, np.ndarray]:
    """Stage `evaluate/...`: one response per evaluation prompt (the same prompts and keys for every policy),
    scored by the learned heads (and the true group rewards of a world); the samples are kept (samples.npz).
    `iterations`: how long the policy trained (a policy trained further is evaluated again)."""
    stage = ctx.stage(stage_name)
    path = stage.path / "samples.npz"
    if evaluated(stage, iterations):
        with np.load(path) as data:
            return {k: data[k] for k in data.files}
    stage.start()
    evaluation = ctx.cfg.evaluation
    batch = prompts.sample(evaluation.prompts, Stream.EVALUATE)
    samples = evaluate_policy(lm, models.policy, scorers(rewards), *batch, sampling=ctx.sampling,
                              key=ctx.key(Stream.EVALUATE), batch_size=evaluation.batch_size,
                              true_reward_fn=models.true_reward_fn)
    if models.world is not None and models.true_reward_fn is None:  # a world that scores text, not token ids
        from maxmin_jax.pipeline.user_world import text_true_rewards

        samples["true_reward"] = text_true_rewards(models.world, models.tokenizer, *batch, samples["tokens"],
                                                   samples["mask"])
    if is_primary():
        stage.path.mkdir(parents=True, exist_ok=True)
        np.savez(path, **samples)
    stage.finish({"samples": path.name, "iterations": iterations})
    return samples


__all__ = ["Rewards", "Scorers", "TrainedPolicy", "cluster_names", "evaluate", "evaluated", "export_policy", "iterate",
           "load_rewards", "objective_options", "reward_models", "standardize", "starting_policy", "train_policy"]
