"""MaxMin-RLHF on pretrained Hugging Face models, driven by a YAML config (`configs/gpt2_imdb.yaml`,
`configs/tulu2_7b_psoups.yaml`). Mirrors `maxmin_jax.experiment` with real models and data in place of the
synthetic world:

policy + reward backbone (hub id or directory, placed on the mesh) -> preference rows (P-Soups files or generic
rows) -> EM mixture of K reward heads and the pooled single reward (LoRA on the backbone when configured) ->
standardise every head against the reference policy -> PPO per objective from the same start (LoRA policy: the
reference is the adapters switched off) -> evaluate with the learned heads and KL -> report.json, table, plots.

Memory: every model is a view of the loaded base weights (`nnx.clone` shares arrays). Under LoRA the reward
backbones' base weights are retyped `FrozenParam` (the EM M-step trains every `nnx.Param`), and PPO trains only
adapters and value head, so policy, reference and both reward models hold one copy of the base between them.

Real data has no true rewards, so a policy's "group_reward" in the report is the learned reward of each EM
cluster's head on the reference-standardised scale (report["group_reward_kind"] says so).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from tqdm.auto import tqdm

from maxmin_jax.config_io import to_dict
from maxmin_jax.data.batching import bucket_length, tokenize_pairs
from maxmin_jax.data.loaders import _read_table, load_grouped, load_preferences, load_psoups
from maxmin_jax.data.schema import DataError, ValidatedRows
from maxmin_jax.eval import evaluate_policy, summarize
from maxmin_jax.experiment import _to_python
from maxmin_jax.models.hf import load_pretrained
from maxmin_jax.models.transformer import CausalLM
from maxmin_jax.policy.model import PolicyWithValue
from maxmin_jax.policy.objectives import RewardStandardizer, make_objective
from maxmin_jax.policy.trainer import PPOTrainer
from maxmin_jax.pretrained_config import (LoraSpec, PreferenceDataConfig, PretrainedExperimentConfig, PromptsConfig,
                                          is_pretrained_config, load_pretrained_config)
from maxmin_jax.rewards.em import split_heldout, clustering_metrics, evaluate_pairs, fit_em, fit_single_reward
from maxmin_jax.rewards.model import RewardModel
from maxmin_jax.sharding import replicated, shard_batch, shard_module

GROUP_REWARD_KIND = ("learned: mean reward of each EM cluster's head, standardised by the reference policy's mean "
                     "and std (reference = 0); real data has no true group rewards")


class FrozenParam(nnx.Variable):
    """A base weight under LoRA. Not an `nnx.Param`, so optimisers that train `nnx.Param` (the EM M-step) leave it
    alone while the adapters (`nnx.LoRAParam`) and reward heads train."""


def freeze_base(module: nnx.Module) -> nnx.Module:
    """Retype every plain `nnx.Param` under `module` (LoRA adapters and other subclasses excluded) as FrozenParam,
    in place, keeping values (no copy) and metadata (logical axes)."""
    for _, node in list(nnx.iter_graph(module)):
        if isinstance(node, nnx.Module):
            for name, var in list(vars(node).items()):
                if type(var) is nnx.Param:
                    setattr(node, name, FrozenParam(var.get_value(), **var.get_metadata()))
    return module


# Loading ----------------------------------------------------------------------------------------------------------
def load_tokenizer(name_or_path: str, *, vocab_size: int | None = None):
    """`AutoTokenizer` (hub id or directory) with left padding. Pads with EOS when it has no pad token (GPT-2) or
    its pad token lies outside the model's `vocab_size` embeddings (pads are masked, so any id in range works)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    if tokenizer.eos_token_id is None:
        raise ValueError(f"{name_or_path}: the tokenizer has no EOS token; responses must end with one")
    if tokenizer.pad_token is None or (vocab_size is not None and tokenizer.pad_token_id >= vocab_size):
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def load_preference_rows(cfg: PreferenceDataConfig) -> ValidatedRows:
    if cfg.psoups is not None:
        return load_psoups(cfg.psoups, users_per_group=cfg.users_per_group or 10, split=cfg.split,
                           skip_invalid=cfg.skip_invalid)
    if isinstance(cfg.files, str):
        return load_preferences(cfg.files, columns=cfg.columns, split=cfg.split, skip_invalid=cfg.skip_invalid)
    return load_grouped(cfg.files, columns=cfg.columns, users_per_group=cfg.users_per_group, split=cfg.split,
                        skip_invalid=cfg.skip_invalid)


def load_prompt_ids(cfg: PromptsConfig, tokenizer, *, limit: int, template=None) -> tuple[list[list[int]], int]:
    """Token ids of every prompt, cut to the first `cfg.max_tokens` (before `template` is applied); prompts over
    `limit` tokens (the model's positions minus the response budget) are dropped. Returns (ids, number dropped)."""
    path = Path(cfg.source)
    if path.suffix.lower() == ".txt":
        if not path.is_file():
            raise DataError(f"{cfg.source}: prompts file not found")
        texts = [line for line in path.read_text().splitlines() if line.strip()]
        name = cfg.source
    else:  # tables by extension, dataset folders and hub ids through datasets.load_dataset, as preferences are
        table, name = _read_table(cfg.source, cfg.split)
        if cfg.column not in table.column_names:
            raise DataError(f"{name}: no column {cfg.column!r} (prompts.column); columns: {table.column_names}")
        if cfg.max_prompts is not None:
            table = table.select(range(min(cfg.max_prompts, table.num_rows)))
        texts = list(table[cfg.column])
    texts = texts[:cfg.max_prompts] if cfg.max_prompts is not None else texts
    bad = next((n for n, t in enumerate(texts, 1) if not isinstance(t, str) or not t.strip()), None)
    if bad is not None:
        raise DataError(f"{name}: prompt {bad}: expected non-empty text, got {texts[bad - 1]!r}")
    # The first N tokens of the text itself, as the paper cuts IMDB reviews; a template goes around the cut text.
    kwargs = {"truncation": True, "max_length": cfg.max_tokens} if cfg.max_tokens else {}
    ids = tokenizer(list(texts), add_special_tokens=False, **kwargs)["input_ids"]
    if template is not None:
        texts = tokenizer.batch_decode(ids) if cfg.max_tokens else texts
        ids = tokenizer([template(t) for t in texts], add_special_tokens=False)["input_ids"]
    kept = [seq for seq in ids if 0 < len(seq) <= limit]
    if not kept:
        raise DataError(f"{name}: no usable prompts (all empty or longer than {limit} tokens; set prompts.max_tokens)")
    return kept, len(ids) - len(kept)


class PromptPool:
    """Prompts as token ids, left padded to ONE length for the whole run, so rollouts compile once."""

    def __init__(self, ids: list[list[int]], pad_id: int, limit: int, seed: int):
        self.ids, self.pad_id = ids, pad_id
        self.length = min(bucket_length(max(map(len, ids))), limit)
        self.rng = np.random.default_rng(seed)

    def sample(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        picks = self.rng.choice(len(self.ids), n, replace=n > len(self.ids))
        tokens = np.full((n, self.length), self.pad_id, np.int32)
        mask = np.zeros((n, self.length), np.int32)
        for row, i in enumerate(picks):
            seq = self.ids[i]
            tokens[row, self.length - len(seq):], mask[row, self.length - len(seq):] = seq, 1
        return tokens, mask


def _check_ids(largest: int, model: CausalLM, what: str) -> None:
    if largest >= model.config.vocab_size:
        raise ValueError(f"{what} has token id {largest}, but the model has only {model.config.vocab_size} "
                         "embeddings: tokenizer and model do not match")


def _reward_model(backbone: CausalLM, num_groups: int, lora: LoraSpec | None, *, seed: int, mesh) -> RewardModel:
    """K heads on a view of `backbone` (shared, uncopied base weights), with its own adapters under LoRA."""
    backbone = nnx.clone(backbone)
    if lora is not None:
        from maxmin_jax.models.lora import add_lora

        add_lora(backbone, rank=lora.rank, alpha=lora.alpha, targets=lora.targets, rngs=nnx.Rngs(seed), mesh=mesh)
        freeze_base(backbone)
    return shard_module(RewardModel.from_backbone(backbone, num_groups, nnx.Rngs(seed)), mesh)


def _cluster_names(assignments: np.ndarray, user_groups: tuple[str, ...] | None, k: int) -> list[str]:
    """Each cluster named after the known group most of its users come from (unique; clusterK when unknown)."""
    names = []
    for c in range(k):
        members = [g for a, g in zip(assignments, user_groups or ()) if a == c]
        name = Counter(members).most_common(1)[0][0] if members else f"cluster{c}"
        names.append(name if name not in names else f"{name}#{c}")
    return names


# The run ----------------------------------------------------------------------------------------------------------
def run_pretrained_experiment(cfg: PretrainedExperimentConfig, out_dir: str | Path | None = None, *,
                              progress: bool = True) -> dict:
    """Run the experiment; returns the report (and writes report.json, table.txt, plots, assignments.json and the
    trained policies to `out_dir`)."""
    t0 = time.perf_counter()
    mesh = cfg.mesh.build()  # first: a wrong mesh fails before anything is downloaded or loaded
    log = (lambda msg: tqdm.write(msg)) if progress else (lambda msg: None)
    key = jax.random.key(cfg.seed)
    rng = np.random.default_rng(cfg.seed)

    # 1. Models and data (preference rows first: a bad file fails before a large model is loaded).
    rows = load_preference_rows(cfg.preferences)
    base = load_pretrained(cfg.policy, dtype=cfg.jnp_dtype, mesh=mesh)
    tokenizer = load_tokenizer(cfg.tokenizer or cfg.policy, vocab_size=base.config.vocab_size)
    _check_ids(tokenizer.eos_token_id, base, "the tokenizer's EOS")
    reward_base = base if cfg.reward_path == cfg.policy else load_pretrained(cfg.reward_path, dtype=cfg.jnp_dtype,
                                                                             mesh=mesh)
    if reward_base.config.vocab_size != base.config.vocab_size:
        raise ValueError(f"reward backbone {cfg.reward_path} has vocabulary {reward_base.config.vocab_size}, policy "
                         f"{cfg.policy} {base.config.vocab_size}: the reward models score the policy's token ids")
    templated = [dataclasses.replace(r, prompt=cfg.format_prompt(r.prompt)) for r in rows.rows]
    pairs = tokenize_pairs(tokenizer, templated, max_length=reward_base.config.max_position_embeddings)
    _check_ids(int(max(pairs.chosen_ids.max(), pairs.rejected_ids.max())), base, "the preference data")
    train_pairs, held_pairs = (split_heldout(pairs, cfg.preferences.heldout_fraction, rng)
                               if cfg.preferences.heldout_fraction else (pairs, None))
    log(f"{len(rows.rows)} preference pairs from {pairs.num_users} users ({len(rows.skipped)} rows skipped)")

    # 2. Rewards: EM mixture of K heads, and the pooled single reward.
    reward_lora = cfg.lora.reward if cfg.lora else None
    mixture = _reward_model(reward_base, cfg.em.num_groups, reward_lora, seed=cfg.seed + 1, mesh=mesh)
    em = fit_em(mixture, train_pairs, dataclasses.replace(cfg.em, progress=progress), mesh=mesh)
    single = _reward_model(reward_base, 1, reward_lora, seed=cfg.seed + 2, mesh=mesh)
    single_fit = fit_single_reward(single, train_pairs, steps=cfg.single_reward_steps, batch_size=cfg.em.batch_size,
                                   m_step_config=cfg.em.m_step, seed=cfg.seed, progress=progress)
    groups = train_pairs.groups
    em_metrics = clustering_metrics(em.assignments, groups) if groups else {"ari": None, "purity": None}
    clusters = _cluster_names(em.assignments, groups, cfg.em.num_groups)
    heldout = ({name: evaluate_pairs(fit, held_pairs, chunk_size=cfg.em.chunk_size)
                for name, fit in (("mixture", em), ("single", single_fit))}
               if held_pairs is not None and held_pairs.num_pairs else None)
    log(f"EM done: ARI {em_metrics['ari']}, weights {np.round(em.weights, 3).tolist()}, clusters {clusters}")

    # 3. Prompts, and every head standardised on the reference policy's samples.
    rollout = dataclasses.replace(cfg.rollout, pad_token_id=int(tokenizer.pad_token_id),
                                  eos_token_id=(cfg.rollout.eos_token_id if cfg.rollout.eos_token_id is not None
                                                else tokenizer.eos_token_id))
    limit = base.config.max_position_embeddings - rollout.max_new_tokens
    if limit < 1:
        raise ValueError(f"rollout.max_new_tokens={rollout.max_new_tokens} leaves no room for a prompt in "
                         f"{base.config.max_position_embeddings} positions")
    prompt_ids, dropped = load_prompt_ids(cfg.prompts, tokenizer, limit=limit,
                                          template=cfg.format_prompt if cfg.prompt_template else None)
    _check_ids(max(max(seq) for seq in prompt_ids), base, "the prompts")
    pool = PromptPool(prompt_ids, int(tokenizer.pad_token_id), limit, cfg.seed)
    placed = lambda n: shard_batch(pool.sample(n), mesh)  # noqa: E731
    policy_lora = cfg.lora.policy if cfg.lora else None
    start = lambda: _starting_policy(base, policy_lora, seed=cfg.seed + 3, mesh=mesh)  # noqa: E731
    # Mixture heads then the single reward, scored together: one evaluation program serves every policy.
    scorers = _Scorers(mixture, single)
    k = cfg.em.num_groups
    evaluate = lambda m, ids_mask, i: evaluate_policy(  # noqa: E731
        m, base, scorers, *ids_mask, rollout=rollout, key=jax.random.fold_in(key, i), batch_size=cfg.eval_batch_size)
    std_rewards = evaluate(start(), placed(cfg.standardizer_prompts), 1)["learned_reward"]
    standardizers = {"mixture": RewardStandardizer.fit(std_rewards[:, :k]),
                     "single": RewardStandardizer.fit(std_rewards[:, k:])}

    # 4. PPO per objective from the same start; evaluation with the mixture's heads (and the single reward).
    eval_batch = placed(cfg.eval_prompts)
    reference_samples = evaluate(start(), eval_batch, 2)
    summary = lambda s: _summary(s, reference_samples, clusters)  # noqa: E731
    policies: dict[str, Any] = {"reference": summary(reference_samples)}
    curves: dict[str, list[dict]] = {}
    for objective_name in cfg.objectives:
        kwargs = {"utilitarian": {"weights": tuple(float(w) for w in em.weights)},
                  "softmin": {"temperature": cfg.softmin_temperature},
                  "dro": {"step_size": cfg.dro_step_size}}.get(objective_name, {})
        reward_model, standardizer = ((single, standardizers["single"]) if objective_name == "single"
                                      else (mixture, standardizers["mixture"]))
        trainer = PPOTrainer(shard_module(PolicyWithValue(start()), mesh), reward_model,
                             make_objective(objective_name, **kwargs), standardizer,
                             reference=None if policy_lora else base, ppo=cfg.ppo, rollout=rollout,
                             lora=policy_lora is not None)
        state = _on_mesh(trainer.init_state(), mesh)  # as the step returns it: the step compiles once
        curve = []
        for it in tqdm(range(cfg.iterations), desc=f"PPO {objective_name}", disable=not progress, leave=False):
            state, metrics = trainer.step(state, *placed(cfg.prompt_batch), jax.random.fold_in(key, 1000 + it))
            curve.append(metrics)
        curves[objective_name] = [_to_python(m) for m in jax.device_get(curve)]
        trained = trainer.policy(state)
        samples = evaluate(trained.lm, eval_batch, 2)
        policies[objective_name] = summary(samples)
        policies[objective_name]["examples"] = tokenizer.batch_decode(samples["tokens"][:3], skip_special_tokens=True)
        if out_dir is not None and cfg.save_policies:
            _save_policy(trained, state.trainable, tokenizer, Path(out_dir) / "policies" / objective_name,
                         lora=policy_lora, base=cfg.policy)
        log(f"{objective_name}: learned group reward {policies[objective_name]['group_reward']}, "
            f"KL {policies[objective_name]['kl']:.2f}")

    file_groups = sorted(set(groups)) if groups else []
    report = {
        "experiment": "pretrained",
        "groups": clusters,
        "group_reward_kind": GROUP_REWARD_KIND,
        "group_sizes": dict(zip(clusters, np.bincount(em.assignments, minlength=len(clusters)).tolist())),
        "file_groups": file_groups,
        "file_group_sizes": {g: list(groups).count(g) for g in file_groups},
        "em": {**em_metrics, "weights": em.weights.tolist(), "cluster_groups": clusters, "history": em.history,
               "heldout": heldout, "users": pairs.num_users, "pairs": pairs.num_pairs,
               "single_reward_history": single_fit.history},
        "policies": policies,
        "curves": curves,
        "data": {"preferences": rows.source, "skipped_rows": len(rows.skipped), "prompts": len(prompt_ids),
                 "prompts_dropped_too_long": dropped, "prompt_length": pool.length},
        "config": to_dict(cfg),
        "mesh": dict(mesh.shape),
        "seconds": time.perf_counter() - t0,
        "devices": [str(d) for d in jax.devices()],
    }
    report = _to_python(report)
    if out_dir is not None:
        from maxmin_jax.report import write_report

        write_report(report, out_dir)
        (Path(out_dir) / "assignments.json").write_text(json.dumps(em.assignment_dict(), indent=2))
    return report


class _Scorers(nnx.Module):
    """The mixture's K heads and the single reward side by side: [B, K + 1]."""

    def __init__(self, mixture: RewardModel, single: RewardModel):
        self.mixture, self.single = mixture, single

    def __call__(self, input_ids, attention_mask=None):
        return jnp.concatenate([self.mixture(input_ids, attention_mask), self.single(input_ids, attention_mask)], -1)


def _starting_policy(base: CausalLM, lora: LoraSpec | None, *, seed: int, mesh) -> CausalLM:
    """Every policy's start: a view of the base weights (no copy), with fresh adapters under LoRA (B = 0, so it
    computes exactly what the base does). The reference is evaluated through this too, so one evaluation program
    serves all policies."""
    lm = nnx.clone(base)
    if lora is not None:
        from maxmin_jax.models.lora import add_lora

        add_lora(lm, rank=lora.rank, alpha=lora.alpha, targets=lora.targets, rngs=nnx.Rngs(seed), mesh=mesh)
    return lm


def _on_mesh(tree, mesh):
    """Leaves not yet placed on `mesh` (optimiser counters, KL and objective state) replicated onto it."""
    def place(x):
        on_mesh = isinstance(getattr(x, "sharding", None), NamedSharding) and x.sharding.mesh == mesh
        return x if on_mesh else jax.device_put(x, replicated(mesh))
    return jax.tree.map(place, tree)


def _summary(samples: dict, reference: dict, clusters: list[str]) -> dict:
    """Per-policy means on the reference-standardised scale. "learned_reward": each mixture head (headK) and the
    single reward ("single"); "group_reward" (read by the table and plots): each cluster's head, under the cluster's
    name (see GROUP_REWARD_KIND)."""
    k = len(clusters)
    summary = summarize(samples, group_names=clusters, reference=reference)
    heads = summary["learned_reward"]
    summary["learned_reward"] = {**{f"head{i}": heads[f"head{i}"] for i in range(k)}, "single": heads[f"head{k}"]}
    summary["group_reward"] = {name: heads[f"head{i}"] for i, name in enumerate(clusters)}
    summary["worst_group_reward"] = min(summary["group_reward"].values())
    return summary


def _save_policy(policy: PolicyWithValue, trainable: nnx.State, tokenizer, directory: Path, *,
                 lora: LoraSpec | None, base: str) -> None:
    """LoRA: the trained adapters and value head as float32 npz (keys are state paths) plus adapter_config.json.
    Full fine-tuning: the whole policy as an HF checkpoint with its tokenizer (loadable with load_pretrained)."""
    directory.mkdir(parents=True, exist_ok=True)
    if lora is None:
        from maxmin_jax.models.hf import save_pretrained

        save_pretrained(policy.lm, directory)
        tokenizer.save_pretrained(directory)
        return
    arrays = {"/".join(map(str, path)): np.asarray(jax.device_get(var.get_value()), dtype=np.float32)
              for path, var in nnx.to_flat_state(trainable)}
    np.savez(directory / "trainable.npz", **arrays)
    (directory / "adapter_config.json").write_text(json.dumps(
        {"base_model": base, "rank": lora.rank, "alpha": lora.alpha, "targets": lora.targets,
         "arrays": sorted(arrays)}, indent=2))


def run_config_file(path: str | Path, out_dir: str | Path, *, progress: bool = True) -> int:
    """`maxmin-jax run CONFIG` for `experiment: pretrained` files: run, print the table, return the exit code."""
    from maxmin_jax.report import format_table

    report = run_pretrained_experiment(load_pretrained_config(path), out_dir, progress=progress)
    print(format_table(report))
    print(f"(rewards: {report['group_reward_kind']})")
    ari = report["em"]["ari"]
    print(f"\nEM: ARI {'n/a' if ari is None else f'{ari:.3f}'}, mixing weights "
          f"{[round(w, 3) for w in report['em']['weights']]}, clusters {report['groups']}")
    print(f"wrote {Path(out_dir) / 'report.json'} ({report['seconds']:.0f} s)")
    return 0


__all__ = ["FrozenParam", "PretrainedExperimentConfig", "freeze_base", "is_pretrained_config", "load_preference_rows",
           "load_prompt_ids", "load_tokenizer", "run_config_file", "run_pretrained_experiment"]
