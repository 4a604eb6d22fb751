"""Synthetic worlds: ground-truth rewards, group sizes, Bradley-Terry labels, conflict."""

from __future__ import annotations

from collections import Counter

import jax
import numpy as np
import pytest

from maxmin_jax.data import ReviewWorld, planted_world, tokenize_pairs, validate_rows
from maxmin_jax.data.synthetic import VOCABULARY


def label_agreement(world, rows):
    """Fraction of rows (ties excluded) where the chosen response has the higher true reward for its user."""
    chosen = world.true_rewards_text([r.chosen for r in rows])
    rejected = world.true_rewards_text([r.rejected for r in rows])
    g = np.array([world.group_names.index(r.group) for r in rows])
    delta = (chosen - rejected)[np.arange(len(rows)), g]
    return float(np.mean(delta[delta != 0] > 0))


def encode_responses(tok, responses, extra_after_eos):
    """Left-padded ids [B, T] of response + EOS + junk (which the reward must ignore)."""
    seqs = [tok(r, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] + extra_after_eos for r in responses]
    length = max(map(len, seqs)) + 2
    ids = np.zeros((len(seqs), length), np.int32)
    mask = np.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, length - len(s):], mask[i, length - len(s):] = s, 1
    return ids, mask


@pytest.mark.parametrize("world", [ReviewWorld(), planted_world()], ids=["review", "planted"])
def test_rewards_on_text_equal_rewards_on_ids(world):
    tok = world.tokenizer()
    responses = world.sample_responses(64, rng=3) + ["was great . weirdword"]  # an unknown word counts as one
    junk = tok("great great great", add_special_tokens=False)["input_ids"]
    ids, mask = encode_responses(tok, responses, extra_after_eos=junk)
    on_ids = np.asarray(jax.jit(world.true_rewards_ids)(ids, mask))
    np.testing.assert_allclose(on_ids, world.true_rewards_text(responses), rtol=1e-5, atol=1e-5)
    # Ids beyond the world's vocabulary (a bigger model vocabulary) score like the unknown word.
    big = ids.copy()
    big[-1, big[-1] == tok.unk_token_id] = 10_000
    np.testing.assert_allclose(np.asarray(world.true_rewards_ids(big, mask)), on_ids, atol=1e-5)


def test_review_rewards_definition():
    world = ReviewWorld()
    rewards = world.true_rewards_text(["was great and wonderful .", "was very dull .", "was great but dull ."])
    np.testing.assert_array_equal(rewards, [[2, -5], [-1, -4], [0, -5]])


def test_review_world_group_sizes_follow_ratio():
    assert ReviewWorld().group_sizes == (100, 10)
    assert ReviewWorld(num_users=44, majority_share=0.75).group_sizes == (33, 11)
    assert ReviewWorld(num_users=5, majority_share=0.99).group_sizes == (4, 1)  # a minority is never empty
    counts = Counter(g for _, g in ReviewWorld().user_groups())
    assert counts == {"positive": 100, "concise": 10}


def test_review_world_rows_shape_and_validity():
    world = ReviewWorld(num_users=22, pairs_per_user=8)
    rows = world.preference_rows()
    assert len(rows) == 22 * 8 and all(r.chosen != r.rejected for r in rows)
    assert len(validate_rows(rows_as_dicts(rows), source="world")) == len(rows)
    per_user = Counter(r.user_id for r in rows)
    assert len(per_user) == 22 and set(per_user.values()) == {8}
    group_of = dict(world.user_groups())
    assert all(r.group == group_of[r.user_id] for r in rows)
    assert Counter(group_of.values()) == {"positive": 20, "concise": 2}
    assert [r.chosen for r in world.preference_rows()] == [r.chosen for r in rows]  # deterministic by seed
    batch = tokenize_pairs(world.tokenizer(), rows)
    assert (batch.chosen_ids != world.tokenizer().unk_token_id).all()  # the vocabulary covers every text


def rows_as_dicts(rows):
    return [dict(user_id=r.user_id, prompt=r.prompt, chosen=r.chosen, rejected=r.rejected, group=r.group)
            for r in rows]


def test_bt_labels_follow_true_reward():
    sharp = ReviewWorld(num_users=40, majority_share=0.5, pairs_per_user=20, bt_temperature=0.25)
    assert label_agreement(sharp, sharp.preference_rows()) > 0.9
    noiseless = ReviewWorld(num_users=20, majority_share=0.5, pairs_per_user=10, bt_temperature=0.0)
    assert label_agreement(noiseless, noiseless.preference_rows()) == 1.0
    noisy = ReviewWorld(num_users=40, majority_share=0.5, pairs_per_user=20, bt_temperature=5.0)
    assert 0.5 < label_agreement(noisy, noisy.preference_rows()) < label_agreement(sharp, sharp.preference_rows())


def test_group_rewards_conflict_and_lengths_vary():
    world = ReviewWorld()
    responses = world.sample_responses(1000, rng=0)
    rewards = world.true_rewards_text(responses)
    assert np.corrcoef(rewards.T)[0, 1] < -0.3  # enthusiastic reviews are longer: the groups want opposite things
    lengths = -rewards[:, 1]
    assert lengths.min() <= 4 and lengths.max() >= 25
    reviews = world.sample_reviews(20, rng=1)
    assert all(r.startswith("review :") for r in reviews)
    assert set(" ".join(reviews).split()) <= set(VOCABULARY)
    assert len(set(world.prompts(50, rng=2))) > 1


def test_planted_world_sizes_and_distinguishable_groups():
    world = planted_world(num_groups=3, group_sizes=(6, 3, 1), pairs_per_user=24, noise=0.3, seed=0)
    assert world.group_sizes == (6, 3, 1) and world.group_names == ("g0", "g1", "g2")
    assert Counter(g for _, g in world.user_groups()) == {"g0": 6, "g1": 3, "g2": 1}
    rows = world.preference_rows()
    assert len(rows) == 10 * 24 and all(r.chosen != r.rejected for r in rows)
    assert label_agreement(world, rows) > 0.8
    # Distinguishable: on random pairs, every two groups disagree about which response is better quite often.
    responses = world.sample_responses(400, rng=5)
    rewards = world.true_rewards_text(responses)
    prefer = np.sign(rewards[:200] - rewards[200:])
    for i in range(3):
        for j in range(i):
            assert np.mean(prefer[:, i] != prefer[:, j]) > 0.3
    scaled = planted_world(num_groups=3, group_sizes=(6, 3, 1), num_users=50)
    assert scaled.group_sizes == (30, 15, 5)
    assert planted_world(4, None, num_users=10).group_sizes == (3, 3, 2, 2)
    with pytest.raises(ValueError, match="group_sizes has 2 entries"):
        planted_world(3, (1, 1))
