"""The inputs of a run: models (loaded, or a small GPT-2 trained on the world's texts), preference pairs, prompts.

Randomness comes from streams named by their purpose (`Stream`): every draw is a function of (seed, purpose,
index) only, so a stage read back from disk leaves the draws of later stages unchanged, and every policy sees the
same prompts in the same iteration (the objectives are compared on paired prompts).
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any, Callable

import jax
import numpy as np
from flax import nnx

from maxmin_jax.data.batching import PairBatch, bucket_length, check_pair_lengths, tokenize_pairs
from maxmin_jax.data.loaders import load_grouped, load_preferences, load_psoups
from maxmin_jax.data.prompts import read_prompts
from maxmin_jax.data.schema import DataError, ValidatedRows
from maxmin_jax.errors import ConfigError, options_under
from maxmin_jax.models.transformer import CausalLM
from maxmin_jax.pipeline.config import (FilePreferences, PromptsConfig, PSoupsPreferences, ScratchModel,
                                        WorldPreferences)
from maxmin_jax.rewards.em import split_heldout


class Stream(enum.IntEnum):
    """Purposes of random draws; a stream's generator is `np.random.default_rng([seed, stream, index])`."""

    SFT = 1
    HELDOUT = 2
    STANDARDIZE = 3
    EVALUATE = 4
    TRAIN = 5
    ADAPTERS = 6


def stream_rng(seed: int, stream: Stream, index: int = 0) -> np.random.Generator:
    return np.random.default_rng([seed, int(stream), index])


# Models -------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Models:
    """The starting policy (also the reference), the reward backbone, the tokenizer and, for a synthetic world,
    the world and its true group rewards on token ids."""

    policy: CausalLM
    reward: CausalLM
    tokenizer: Any
    world: Any | None = None
    true_reward_fn: Callable | None = None
    info: dict = dataclasses.field(default_factory=dict)


def build_models(ctx) -> Models:
    cfg = ctx.cfg
    world = cfg.preferences.world.build() if isinstance(cfg.preferences, WorldPreferences) else None
    if isinstance(cfg.model, ScratchModel):
        tokenizer = world.tokenizer()
        lm, info = _sft_model(ctx, world, tokenizer)
        return Models(lm, lm, tokenizer, world, world.true_rewards_ids, info)

    from maxmin_jax.data.tokenizer import load_tokenizer
    from maxmin_jax.models.hf import load_pretrained

    spec = cfg.model
    dtype = {"float32": jax.numpy.float32, "bfloat16": jax.numpy.bfloat16}[spec.dtype]
    policy = load_pretrained(spec.policy, dtype=dtype, mesh=ctx.mesh)
    tokenizer = load_tokenizer(spec.tokenizer or spec.policy, vocab_size=policy.config.vocab_size)
    check_ids(tokenizer.eos_token_id, policy, "the tokenizer's EOS")
    reward_path = spec.reward_backbone or spec.policy
    reward = policy if reward_path == spec.policy else load_pretrained(reward_path, dtype=dtype, mesh=ctx.mesh)
    if reward.config.vocab_size != policy.config.vocab_size:
        raise ConfigError(f"model.reward_backbone: {reward_path} has vocabulary {reward.config.vocab_size}, the "
                          f"policy {spec.policy} {policy.config.vocab_size}; reward models score the policy's tokens")
    true_reward_fn = None
    if world is not None and world.true_rewards_ids is not None:  # read from token ids: the world's tokenizer only
        if tokenizer.get_vocab() != world.tokenizer().get_vocab():
            raise ConfigError("preferences.source 'world' with a pretrained model needs a model that uses the "
                              "world's tokenizer (its true rewards are read from token ids); use model.source "
                              "'scratch', or preferences from files")
        true_reward_fn = world.true_rewards_ids
    return Models(policy, reward, tokenizer, world, true_reward_fn)


def _sft_model(ctx, world, tokenizer) -> tuple[CausalLM, dict]:
    """The world's small GPT-2, trained from scratch on its texts (stage `sft`), or read back when done."""
    from maxmin_jax.models import GPT2Config, build_model
    from maxmin_jax.policy.sft import texts_to_batch, train_sft

    spec = ctx.cfg.model
    config = GPT2Config(vocab_size=len(tokenizer), max_position_embeddings=spec.max_position_embeddings,
                        hidden_size=spec.hidden_size, num_layers=spec.num_layers, num_heads=spec.num_heads)
    lm = build_model(config, rngs=nnx.Rngs(ctx.cfg.seed))
    if ctx.mesh is not None:
        from maxmin_jax.sharding import shard_module

        shard_module(lm, ctx.mesh)
    stage = ctx.stage("sft")
    if stage.done:
        nnx.update(lm, stage.restore_state(nnx.state(lm, nnx.Param)))
        return lm, stage.result
    stage.start()
    ids, mask = texts_to_batch(tokenizer, world.sample_reviews(spec.sft_examples, stream_rng(ctx.cfg.seed,
                                                                                                Stream.SFT)))
    lm, losses = train_sft(lm, ids, mask, spec.sft, progress=ctx.progress)
    for step, loss in enumerate(losses, start=1):
        ctx.metrics.write(stage.name, step, {"loss": loss})
    stage.save_state(nnx.state(lm, nnx.Param))
    ctx.log(f"SFT done: loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    return lm, stage.finish({"sft_loss": [losses[0], losses[-1]]})


def check_ids(largest: int, model: CausalLM, what: str) -> None:
    if largest >= model.config.vocab_size:
        raise DataError(f"{what} has token id {largest}, but the model has only {model.config.vocab_size} "
                        "embeddings: tokenizer and model do not match")


# Preferences --------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Preferences:
    """Tokenised pairs, split by user into training and held-out pairs."""

    train: PairBatch
    heldout: PairBatch | None
    info: dict


@dataclasses.dataclass
class PreferenceRows:
    rows: list
    skipped: int
    source: str


def read_preference_rows(cfg) -> PreferenceRows:
    """The labelled rows (before any model is loaded: a bad file fails fast)."""
    source = cfg.preferences
    if isinstance(source, WorldPreferences):
        return PreferenceRows(source.world.build().preference_rows(), 0, f"world {source.world.name}")
    with options_under("preferences"):  # a hint names preferences.skip_invalid, not the loader's keyword
        if isinstance(source, PSoupsPreferences):
            loaded = load_psoups(source.files, users_per_group=source.users_per_group, split=source.split,
                                 skip_invalid=source.skip_invalid)
        elif isinstance(source, FilePreferences) and isinstance(source.files, str):
            loaded = load_preferences(source.files, columns=source.columns, split=source.split,
                                      skip_invalid=source.skip_invalid, coerce_user_id=source.coerce_user_id)
        else:
            loaded = load_grouped(source.files, columns=source.columns, users_per_group=source.users_per_group,
                                  split=source.split, skip_invalid=source.skip_invalid,
                                  coerce_user_id=source.coerce_user_id)
    return PreferenceRows(loaded.rows, len(loaded.skipped), loaded.source)


def load_preference_pairs(ctx, models: Models, read: PreferenceRows) -> Preferences:
    """The rows tokenised for the reward backbone (prompt template applied) and split by user into training and
    held-out pairs."""
    cfg, source = ctx.cfg, ctx.cfg.preferences
    rows, skipped, name = read.rows, read.skipped, read.source
    if cfg.prompt_template is not None:
        rows = [dataclasses.replace(r, prompt=cfg.format_prompt(r.prompt)) for r in rows]
    max_length = models.reward.config.max_position_embeddings
    # Pairs too long for the reward model: an error naming file and row, or skipped and counted (skip_invalid).
    checked = check_pair_lengths(ValidatedRows(rows, source=name), models.tokenizer, max_length=max_length,
                                 skip_invalid=getattr(source, "skip_invalid", False))
    rows, skipped = checked.rows, skipped + len(checked.skipped)
    pairs = tokenize_pairs(models.tokenizer, rows, max_length=max_length)
    check_ids(int(max(pairs.chosen_ids.max(), pairs.rejected_ids.max())), models.reward, "the preference data")
    heldout = None
    train = pairs
    if source.heldout_fraction:
        train, heldout = split_heldout(pairs, source.heldout_fraction, stream_rng(cfg.seed, Stream.HELDOUT))
        heldout = heldout if heldout.num_pairs else None
    ctx.log(f"{pairs.num_pairs} preference pairs from {pairs.num_users} users ({skipped} rows skipped)")
    return Preferences(train, heldout, {"preferences": name, "skipped_rows": skipped, "pairs": pairs.num_pairs,
                                        "users": pairs.num_users})


# Prompts ------------------------------------------------------------------------------------------------------------
class PromptSource:
    """Prompts as token ids, left padded to one length for the whole run (rollouts compile once). `sample(n,
    stream, index)` depends only on (seed, stream, index): the same prompts for every policy, whether the run
    went straight through or was resumed."""

    def __init__(self, draw: Callable[[int, np.random.Generator], list[list[int]]], *, length: int, pad_id: int,
                 seed: int, mesh=None):
        self.draw, self.length, self.pad_id, self.seed, self.mesh = draw, length, pad_id, seed, mesh

    def sample(self, n: int, stream: Stream, index: int = 0) -> tuple[Any, Any]:
        tokens = np.full((n, self.length), self.pad_id, np.int32)
        mask = np.zeros((n, self.length), np.int32)
        for row, seq in enumerate(self.draw(n, stream_rng(self.seed, stream, index))):
            if len(seq) > self.length:
                raise DataError(f"a prompt of {len(seq)} tokens does not fit the run's prompt length {self.length}")
            tokens[row, self.length - len(seq):], mask[row, self.length - len(seq):] = seq, 1
        if self.mesh is None:
            return tokens, mask
        from maxmin_jax.sharding import shard_batch

        return shard_batch((tokens, mask), self.mesh)


def prompt_source(ctx, models: Models) -> tuple[PromptSource, dict]:
    """The run's prompts (the world's, or `cfg.prompts`) and what the report says about them."""
    cfg = ctx.cfg
    tokenizer = models.tokenizer
    limit = models.policy.config.max_position_embeddings - cfg.sampling.max_new_tokens
    if limit < 1:
        raise ConfigError(f"sampling.max_new_tokens={cfg.sampling.max_new_tokens} leaves no room for a prompt in "
                          f"{models.policy.config.max_position_embeddings} positions")
    if cfg.prompts is None:
        if models.world is None:
            raise ConfigError("prompts: required unless preferences.source is 'world' (which supplies its own)")
        world = models.world

        def draw(n, rng):
            texts = [cfg.format_prompt(t) for t in world.prompts(n, rng)]
            return tokenizer(texts, add_special_tokens=False)["input_ids"]

        longest = max(map(len, draw(256, np.random.default_rng(0))))
        info = {"prompts": f"world {cfg.preferences.world.name}"}
    else:
        ids, skipped = load_prompt_ids(cfg.prompts, tokenizer, limit=limit,
                                       template=cfg.format_prompt if cfg.prompt_template else None)
        check_ids(max(max(seq) for seq in ids), models.policy, "the prompts")

        def draw(n, rng):
            return [ids[i] for i in rng.choice(len(ids), n, replace=n > len(ids))]

        longest = max(map(len, ids))
        info = {"prompts": len(ids), "prompts_skipped": skipped}
    length = min(bucket_length(longest), limit)
    return (PromptSource(draw, length=length, pad_id=int(tokenizer.pad_token_id), seed=cfg.seed, mesh=ctx.mesh),
            {**info, "prompt_length": length})


def load_prompt_ids(cfg: PromptsConfig, tokenizer, *, limit: int, template=None) -> tuple[list[list[int]], int]:
    """Token ids of the prompts `read_prompts` accepts: every bad row (not text, empty, over `limit` tokens: the
    model's positions minus the response budget) is an error naming file and row, or skipped and counted with
    `cfg.skip_invalid`. Each prompt is cut to its first `cfg.max_tokens` tokens, then `template` goes around it.
    Returns (ids, rows skipped)."""
    def encode(texts: list[str]) -> list[list[int]]:
        # The first N tokens of the text itself, as the paper cuts IMDB reviews; a template goes around the cut.
        kwargs = {"truncation": True, "max_length": cfg.max_tokens} if cfg.max_tokens else {}
        ids = tokenizer(texts, add_special_tokens=False, **kwargs)["input_ids"]
        if template is None:
            return ids
        texts = tokenizer.batch_decode(ids) if cfg.max_tokens else texts
        return tokenizer([template(t) for t in texts], add_special_tokens=False)["input_ids"]

    with options_under("prompts"):
        prompts = read_prompts(cfg.source, column=cfg.column, split=cfg.split, encode=encode, max_length=limit,
                               skip_invalid=cfg.skip_invalid, max_rows=cfg.max_prompts)
    return prompts.ids, len(prompts.skipped)


__all__ = ["Models", "PreferenceRows", "Preferences", "PromptSource", "Stream", "build_models",
           "load_preference_pairs", "load_prompt_ids", "prompt_source", "read_preference_rows", "stream_rng"]
