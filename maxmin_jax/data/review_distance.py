"""The review world with a tunable distance between its two groups' preferences (for the impossibility sweep).

The minority's reward is a blend of the majority's and conciseness: r_concise' = (1 - distance) * r_positive +
distance * r_concise, so distance 1 is `ReviewWorld` (enthusiasm against brevity) and distance 0 makes the two
groups agree. The groups' names, users, prompts and texts are the review world's.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from maxmin_jax.data.synthetic import ReviewWorld


@dataclasses.dataclass(frozen=True, kw_only=True)
class ReviewDistanceWorld(ReviewWorld):
    """`ReviewWorld` whose minority wants `distance` of conciseness and `1 - distance` of the majority's enthusiasm.

    Attributes (besides the review world's):
      distance: in [0, 1]; 1 is the review world, 0 two groups with the same preference.
    """

    distance: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.distance <= 1.0:
            raise ValueError(f"distance must be in [0, 1], got {self.distance}")

    def _word_values(self) -> np.ndarray:
        values = super()._word_values()
        values[:, 1] = (1.0 - self.distance) * values[:, 0] + self.distance * values[:, 1]
        return values


__all__ = ["ReviewDistanceWorld"]
