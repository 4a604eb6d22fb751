"""What a trainer trains: one nnx filter, the same for every trainer (SFT, the EM M-step, PPO).

Full fine-tuning trains every `nnx.Param`. Under LoRA the base weights stay as they are and only the adapters
(`nnx.LoRAParam`) and the heads a model puts on a backbone (`HeadParam`: the policy's value head, the reward
heads) train. Every trainer takes the filter as `trainable=`: `train_sft`, `fit_em`, `fit_single_reward`,
`PPOTrainer`.
"""

from __future__ import annotations

from flax import nnx


class HeadParam(nnx.Param):
    """Weights of a head on a backbone (value head, reward heads): trained even when the backbone is frozen."""


ADAPTERS_AND_HEADS = nnx.Any(nnx.LoRAParam, HeadParam)
"""LoRA adapters and heads: what trains when the base weights are frozen."""


def trainable_filter(*, lora: bool) -> nnx.filterlib.Filter:
    """Every parameter (full fine-tuning), or with `lora` only the adapters and the heads."""
    return ADAPTERS_AND_HEADS if lora else nnx.Param


__all__ = ["ADAPTERS_AND_HEADS", "HeadParam", "trainable_filter"]
