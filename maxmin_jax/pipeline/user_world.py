"""Worlds users bring: `world: {factory: "package.module:function", ...keyword arguments}` (docs/worlds.md).

A factory returns an object with the world protocol's members: `group_names`, `tokenizer()`, `prompts(n, rng)`,
`true_rewards(prompts, responses)` ([N, G] for text), `user_groups()` and `preference_rows(rng)`. `ProtocolWorld`
gives the pipeline what it reads of a built-in world on top of that:

- `group_sizes`, counted from `user_groups()`;
- `sample_reviews(n, rng)`, the texts a scratch model is trained on: the world's own if it has the method, else
  "prompt response" texts drawn from its labelled pairs (both responses of each pair);
- `true_rewards_ids(ids, mask)`, the jittable true rewards on token ids, only where the world defines it; otherwise
  None, and the evaluation decodes each response and scores the text with `true_rewards` on the host
  (`text_true_rewards`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np

from maxmin_jax.data.world import PROTOCOL, missing_members


class ProtocolWorld:
    """A world built by a factory, seen through the pipeline's interface (module docstring)."""

    def __init__(self, world: Any, factory: str):
        missing = missing_members(world)
        if missing:
            raise ValueError(f"{factory} returned a {type(world).__name__} without {', '.join(missing)}: a world "
                             f"needs {', '.join(PROTOCOL)} (docs/worlds.md)")
        self.world, self.factory = world, factory
        self.group_names = tuple(world.group_names)
        if len(self.group_names) < 1 or len(set(self.group_names)) != len(self.group_names):
            raise ValueError(f"{factory}: group_names must be distinct names, got {self.group_names}")
        counts = Counter(group for _, group in world.user_groups())
        unknown = sorted(set(counts) - set(self.group_names))
        if unknown:
            raise ValueError(f"{factory}: user_groups() names groups {unknown} not in group_names {self.group_names}")
        self.group_sizes = tuple(counts[g] for g in self.group_names)

    @property
    def num_groups(self) -> int:
        return len(self.group_names)

    @property
    def true_rewards_ids(self):
        return getattr(self.world, "true_rewards_ids", None)

    def tokenizer(self):
        return self.world.tokenizer()

    def prompts(self, n: int, rng=None) -> list[str]:
        return list(self.world.prompts(n, rng))

    def true_rewards(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
        rewards = np.asarray(self.world.true_rewards(list(prompts), list(responses)), np.float32)
        if rewards.shape != (len(responses), self.num_groups):
            raise ValueError(f"{self.factory}: true_rewards returned shape {rewards.shape}, expected "
                             f"{(len(responses), self.num_groups)} (responses, groups)")
        return rewards

    def user_groups(self) -> list[tuple[str, str]]:
        return list(self.world.user_groups())

    def preference_rows(self, rng=None):
        return self.world.preference_rows() if rng is None else self.world.preference_rows(rng)

    def sample_reviews(self, n: int, rng=None) -> list[str]:
        if hasattr(self.world, "sample_reviews"):
            return list(self.world.sample_reviews(n, rng))
        rows = self.preference_rows()
        texts = [f"{r.prompt} {response}" for r in rows for response in (r.chosen, r.rejected)]
        return [texts[i] for i in np.random.default_rng(rng).integers(0, len(texts), n)]


def text_true_rewards(world, tokenizer, prompts: np.ndarray, prompt_mask: np.ndarray, tokens: np.ndarray,
                      mask: np.ndarray) -> np.ndarray:
    """[N, G] true rewards of sampled responses, scored as text: each prompt and response decoded (the response up
    to its mask, special tokens dropped) and passed to `world.true_rewards`."""
    decode = lambda ids, keep: [tokenizer.decode([t for t, k in zip(row, m) if k], skip_special_tokens=True)  # noqa
                                for row, m in zip(np.asarray(ids).tolist(), np.asarray(keep).tolist())]
    return world.true_rewards(decode(prompts, prompt_mask), decode(tokens, mask))


__all__ = ["ProtocolWorld", "text_true_rewards"]
