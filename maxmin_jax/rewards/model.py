"""Reward models: a causal-LM backbone read at the last real token, with K scalar heads (one per user group).

Two layouts give the same interface, `model(ids, mask) -> [B, K]` float32 rewards:
- `RewardModel`: one shared backbone, K heads; all K rewards from one forward pass (the cheap mixture).
- `SeparateRewardModels`: K backbones (the paper's setup), their parameters stacked on a leading "groups" axis
  and run with `jax.vmap`, so the K forward passes are one batched computation, not a Python loop.
Both keep every parameter's `logical_axes`, so `maxmin_jax.sharding.shard_module` places them on a mesh.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

from maxmin_jax.models import ModelConfig, build_model
from maxmin_jax.models.transformer import CausalLM
from maxmin_jax.trainable import HeadParam

HEAD_INIT_STD = 0.02


def last_token(hidden: Float[Array, "*k b t d"], mask: Int[Array, "b t"] | None) -> Float[Array, "*k b d"]:
    """Hidden state at each row's last real token. Left padding puts it at the last column, but the index is
    taken from the mask so right-padded or unpadded inputs are read correctly too."""
    t = hidden.shape[-2]
    if mask is None:
        return hidden[..., -1, :]
    last = jnp.max(jnp.where(mask > 0, jnp.arange(t), 0), axis=-1)  # [B]; an all-pad row reads column 0
    # A one-hot contraction rather than a gather: exact (x * 1 + 0s), and it broadcasts over a leading K axis.
    return jnp.einsum("...btd,bt->...bd", hidden, jax.nn.one_hot(last, t, dtype=hidden.dtype))


def _heads(num_groups: int, hidden_size: int, rngs: nnx.Rngs) -> tuple[HeadParam, HeadParam]:
    kernel = HEAD_INIT_STD * jax.random.normal(rngs.params(), (hidden_size, num_groups), jnp.float32)
    return (HeadParam(kernel, logical_axes=("embed", "groups")),
            HeadParam(jnp.zeros((num_groups,), jnp.float32), logical_axes=("groups",)))


class _HeadsMixin:
    head: HeadParam
    head_bias: HeadParam

    @property
    def num_groups(self) -> int:
        return int(self.head.get_value().shape[-1])

    def reinit_heads(self, key: jax.Array) -> None:
        """Fresh random heads (restarts of EM start from the same backbone with new heads)."""
        kernel = self.head.get_value()
        self.head.set_value(HEAD_INIT_STD * jax.random.normal(key, kernel.shape, jnp.float32).astype(kernel.dtype))
        self.head_bias.set_value(jnp.zeros_like(self.head_bias.get_value()))


class RewardModel(_HeadsMixin, nnx.Module):
    """Shared backbone + K linear heads on the final-norm hidden state of the last real token."""

    shared_backbone = True

    def __init__(self, backbone: CausalLM, num_groups: int, *, rngs: nnx.Rngs):
        if num_groups < 1:
            raise ValueError(f"num_groups must be >= 1, got {num_groups}")
        self.backbone = backbone
        self.head, self.head_bias = _heads(num_groups, backbone.config.hidden_size, rngs)

    @property
    def config(self) -> ModelConfig:
        return self.backbone.config

    @classmethod
    def from_backbone(cls, backbone: CausalLM, num_groups: int, rngs: nnx.Rngs) -> RewardModel:
        return cls(backbone, num_groups, rngs=rngs)

    @classmethod
    def from_config(cls, config: ModelConfig, num_groups: int, rngs: nnx.Rngs, **model_kwargs) -> RewardModel:
        return cls(build_model(config, rngs=rngs, **model_kwargs), num_groups, rngs=rngs)

    def with_num_groups(self, num_groups: int, rngs: nnx.Rngs) -> RewardModel:
        """A reward model with `num_groups` fresh heads on this very backbone (shared, not copied)."""
        return type(self)(self.backbone, num_groups, rngs=rngs)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, num_groups: int, rngs: nnx.Rngs, *, dtype=jnp.float32,
                        mesh=None) -> RewardModel:
        from maxmin_jax.models.hf import load_pretrained
        from maxmin_jax.sharding import shard_module

        model = cls(load_pretrained(path, dtype=dtype, mesh=mesh), num_groups, rngs=rngs)
        return shard_module(model, mesh) if mesh is not None else model

    def __call__(self, input_ids: Int[Array, "b t"], attention_mask: Int[Array, "b t"] | None = None
                 ) -> Float[Array, "b k"]:
        h = last_token(self.backbone.hidden_states(input_ids, attention_mask), attention_mask).astype(jnp.float32)
        return h @ self.head[...] + self.head_bias[...]


class SeparateRewardModels(_HeadsMixin, nnx.Module):
    """K independent backbones, each with its own scalar head (column k of `head`), as in the paper.

    `stacked` is one backbone module whose parameters carry an extra leading axis of size K (logical axis
    "groups"); it is never called directly: `__call__` vmaps the backbone's forward over that axis.
    """

    shared_backbone = False

    def __init__(self, backbones: Sequence[CausalLM], *, rngs: nnx.Rngs):
        if not backbones:
            raise ValueError("need at least one backbone")
        graphdefs_states = [nnx.split(b) for b in backbones]
        graphdef = graphdefs_states[0][0]
        if any(g != graphdef for g, _ in graphdefs_states):
            raise ValueError("all backbones must have the same architecture and config")
        flat = [nnx.to_flat_state(s) for _, s in graphdefs_states]
        stacked = []
        for i, (path, var) in enumerate(flat[0]):
            value = jnp.stack([f[i][1].get_value() for f in flat])
            axes = var.get_metadata().get("logical_axes") or (None,) * (value.ndim - 1)
            stacked.append((path, var.replace(value, logical_axes=("groups", *axes))))
        self.stacked = nnx.merge(graphdef, nnx.from_flat_state(stacked))
        self.head, self.head_bias = _heads(len(backbones), backbones[0].config.hidden_size, rngs)

    @property
    def config(self) -> ModelConfig:
        return self.stacked.config

    @classmethod
    def from_backbone(cls, backbone: CausalLM, num_groups: int, rngs: nnx.Rngs) -> SeparateRewardModels:
        """K copies of one (pretrained) backbone: every group's model starts from the same LM, as in the paper."""
        return cls([backbone] * num_groups, rngs=rngs)

    def with_num_groups(self, num_groups: int, rngs: nnx.Rngs) -> SeparateRewardModels:
        """`num_groups` copies of this model's first backbone, with fresh heads."""
        graphdef, state = nnx.split(self.stacked)
        flat = []
        for path, var in nnx.to_flat_state(state):
            axes = var.get_metadata().get("logical_axes")
            flat.append((path, var.replace(var.get_value()[0], logical_axes=axes[1:] if axes else None)))
        first = nnx.merge(graphdef, nnx.from_flat_state(flat))
        return type(self).from_backbone(first, num_groups, rngs)

    @classmethod
    def from_config(cls, config: ModelConfig, num_groups: int, rngs: nnx.Rngs, **model_kwargs
                    ) -> SeparateRewardModels:
        return cls([build_model(config, rngs=rngs, **model_kwargs) for _ in range(num_groups)], rngs=rngs)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, num_groups: int, rngs: nnx.Rngs, *, dtype=jnp.float32,
                        mesh=None) -> SeparateRewardModels:
        from maxmin_jax.models.hf import load_pretrained
        from maxmin_jax.sharding import shard_module

        model = cls.from_backbone(load_pretrained(path, dtype=dtype), num_groups, rngs)
        return shard_module(model, mesh) if mesh is not None else model

    def __call__(self, input_ids: Int[Array, "b t"], attention_mask: Int[Array, "b t"] | None = None
                 ) -> Float[Array, "b k"]:
        graphdef, state = nnx.split(self.stacked)

        def one(s):
            return nnx.merge(graphdef, s).hidden_states(input_ids, attention_mask)

        h = last_token(jax.vmap(one)(state), attention_mask).astype(jnp.float32)  # [K, B, D]
        return jnp.einsum("kbd,dk->bk", h, self.head[...]) + self.head_bias[...]


def build_reward_model(backbone_or_config: CausalLM | ModelConfig, num_groups: int, *, shared_backbone: bool = True,
                       rngs: nnx.Rngs) -> RewardModel | SeparateRewardModels:
    """The reward model for a backbone (copied K times when not shared) or a config (fresh random weights)."""
    cls = RewardModel if shared_backbone else SeparateRewardModels
    if isinstance(backbone_or_config, CausalLM):
        return cls.from_backbone(backbone_or_config, num_groups, rngs)
    return cls.from_config(backbone_or_config, num_groups, rngs)


def score_pairs(model, chosen_ids, chosen_mask, rejected_ids, rejected_mask
                ) -> tuple[Float[Array, "n k"], Float[Array, "n k"]]:
    """Rewards of both responses of N pairs in one forward pass (chosen and rejected share T by construction)."""
    n = chosen_ids.shape[0]
    r = model(jnp.concatenate([chosen_ids, rejected_ids]), jnp.concatenate([chosen_mask, rejected_mask]))
    return r[:n], r[n:]
