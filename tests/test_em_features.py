"""The token features of EM's start, by their arithmetic: the length hinges let a linear head prefer a length in the
middle (which the length column alone cannot), and they measure the response, not the prompt."""

import numpy as np

from maxmin_jax.data.batching import PairBatch
from maxmin_jax.rewards.features import length_hinges, pair_features


def _batch(pairs: list[tuple[list[int], list[int], list[int]]]) -> PairBatch:
    """(prompt, chosen response, rejected response) token ids -> a left-padded PairBatch, one user."""
    width = max(len(p) + max(len(c), len(r)) for p, c, r in pairs)

    def pad(seqs):
        ids = np.zeros((len(seqs), width), np.int32)
        mask = np.zeros((len(seqs), width), np.int32)
        for i, s in enumerate(seqs):
            ids[i, width - len(s):] = s
            mask[i, width - len(s):] = 1
        return ids, mask

    chosen_ids, chosen_mask = pad([p + c for p, c, _ in pairs])
    rejected_ids, rejected_mask = pad([p + r for p, _, r in pairs])
    return PairBatch(chosen_ids, chosen_mask, rejected_ids, rejected_mask, np.zeros(len(pairs), np.int32), ("u",))


def test_length_hinges_represent_a_preferred_middle_length():
    rng = np.random.default_rng(0)
    chosen, rejected = rng.integers(2, 30, size=200), rng.integers(2, 30, size=200)
    hinges = length_hinges(chosen, rejected, knots=3)
    knots = np.quantile(np.concatenate([chosen, rejected]).astype(float), [0.25, 0.5, 0.75])
    assert hinges.shape == (200, 3)
    np.testing.assert_allclose(hinges[:, 1], np.maximum(chosen - knots[1], 0) - np.maximum(rejected - knots[1], 0))
    # -|L - q| = (L - q) - 2 max(0, L - q): with the length column, exactly linear at a knot ...
    middle = knots[1]
    target = -np.abs(chosen - middle) + np.abs(rejected - middle)
    x = np.concatenate([(chosen - rejected)[:, None], hinges], axis=1)
    np.testing.assert_allclose(x @ np.array([1.0, 0.0, -2.0, 0.0]), target, atol=1e-9)
    # ... and out of reach of the length column alone.
    length_only = np.linalg.lstsq(x[:, :1], target, rcond=None)
    assert length_only[1][0] > 0.5 * np.sum(target**2)


def test_pair_features_hinge_the_response_length_not_the_prompt():
    # Same response lengths (3 vs 6 tokens) after prompts of 1 and 5 tokens: the same hinge values.
    pairs = [([40], [1, 2, 3], [4, 5, 6, 7, 8, 9]), ([40, 41, 42, 43, 44], [1, 2, 3], [4, 5, 6, 7, 8, 9]),
             ([40, 45], [11, 12, 13, 14, 15, 16, 17, 18, 19], [1, 2, 3])]
    batch = _batch(pairs)
    plain = pair_features(batch, clusters=2, tokens=0)
    shaped = pair_features(batch, clusters=2, tokens=0, length_knots=1)
    assert shaped.shape[1] == plain.shape[1] + 1
    np.testing.assert_array_equal(shaped[:, :plain.shape[1]], plain)
    # Response lengths 3, 6, 3, 6, 9, 3: median knot 4.5; hinges 0 - 1.5, 0 - 1.5, 4.5 - 0.
    np.testing.assert_allclose(shaped[:, -1], [-1.5, -1.5, 4.5])


def test_a_candidate_tried_on_top_of_the_best_must_win_clearly():
    """The length hinges replace the chosen feature set only when they predict left-out users better by more than
    one standard error of the per-user differences: a small total gain made of noise does not count."""
    from types import SimpleNamespace

    from maxmin_jax.rewards.start import _clearly_better

    rng = np.random.default_rng(0)
    old = SimpleNamespace(user_scores=rng.normal(-20.0, 3.0, size=40))
    noise = rng.normal(0.0, 1.0, size=40)
    noise += 0.5 / 40 - noise.mean()  # +0.5 nats in total, per-user spread 1: SE about 6
    assert not _clearly_better(SimpleNamespace(user_scores=old.user_scores + noise), old)
    # A middle-length group fitted at last: +1.5 nats for each of its 13 users, the others as noisy as before.
    gain = noise + np.where(np.arange(40) < 13, 1.5, 0.0)
    assert _clearly_better(SimpleNamespace(user_scores=old.user_scores + gain), old)
