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


# The world protocol and the EM zoo ----------------------------------------------------------------------------------
from maxmin_jax.data import world as world_module  # noqa: E402
from maxmin_jax.data.world import PreferenceWorld, SyntheticWorld, load_world, true_reward_gaps  # noqa: E402
from maxmin_jax.data.zoo import FAMILIES, ZooWorld, features, sample_world, sunsea_world, zoo, zoo_world  # noqa: E402


def _sizes(world):
    return Counter(g for _, g in world.user_groups())


@pytest.mark.parametrize("family", FAMILIES)
def test_zoo_worlds_follow_the_protocol(family):
    world = zoo_world(family, num_users=12, pairs_per_user=4, seed=3)
    assert isinstance(world, PreferenceWorld) and isinstance(world, SyntheticWorld)
    rows = world.preference_rows()
    assert len(rows) == 48 and all(r.chosen != r.rejected for r in rows)
    assert len(validate_rows(rows_as_dicts(rows), source="zoo")) == 48
    assert dict(_sizes(world)) == dict(zip(world.group_names, world.group_sizes))
    assert rows == world.preference_rows()  # a world is a fixed function of its settings
    prompts = world.prompts(6, rng=1)
    rewards = world.true_rewards(prompts, world.candidates(prompts, rng=2))
    assert rewards.shape == (6, world.num_groups) and np.isfinite(rewards).all()
    batch = tokenize_pairs(world.tokenizer(), rows, max_length=64)
    assert (batch.chosen_ids != world.tokenizer().unk_token_id).all()  # one vocabulary covers the whole zoo


def test_review_and_planted_worlds_follow_the_protocol():
    for world in (ReviewWorld(num_users=6, pairs_per_user=2), planted_world(2, (2, 2), pairs_per_user=2)):
        assert isinstance(world, PreferenceWorld)
        responses = world.sample_responses(5, rng=0)
        np.testing.assert_array_equal(world.true_rewards(["p"] * 5, responses), world.true_rewards_text(responses))


def test_zoo_rewards_are_the_family_definitions():
    prompts = ["briefly tell me about the sun :", "in detail describe the sea :"]
    responses = ["sun sun sea ! -", "the sea is warm , maybe ?"]
    f = features(prompts, responses)
    np.testing.assert_array_equal(f["count:sun"], [2, 1])  # "warm" is a sun word
    np.testing.assert_array_equal(f["length"], [5, 7])
    np.testing.assert_array_equal(f["on_topic"], [2, 1])  # sun words for the sun prompt, sea words for the sea one
    np.testing.assert_array_equal(f["next_topic"], [1, 0])  # after sun comes sea; after sea, forest
    np.testing.assert_array_equal(f["instructed_length"], [-5, 7])
    np.testing.assert_array_equal(f["count:hedge"], [0, 1])
    world = sunsea_world(0)
    assert world.group_names == ("sun", "sea", "short") and world.group_sizes == (30, 15, 5)
    np.testing.assert_array_equal(world.true_rewards(prompts, responses), [[2, 1, -5], [1, 1, -7]])
    scaled = zoo_world("lexical", num_groups=2, seed=0)
    gaps = scaled.true_rewards(*_random_pairs(scaled, 0)) - scaled.true_rewards(*_random_pairs(scaled, 1))
    np.testing.assert_allclose(np.abs(gaps).mean(0), 1.0, atol=0.2)  # temperatures are in mean-gap units


def _random_pairs(world, seed):
    prompts = world.prompts(400, rng=7)
    return prompts, world.candidates(prompts, rng=seed)


def test_sampled_worlds_stay_in_the_documented_ranges():
    for seed in range(40):
        w = sample_world(seed)
        assert 2 <= w.num_groups <= 5 and max(w.group_sizes) / min(w.group_sizes) <= 20 * 1.5 + 1
        assert 8 <= w.pairs_per_user <= 32 and 0 <= w.flip_rate <= 0.1 and 0.2 <= w.bt_temperature <= 1.0
        assert 30 <= w.num_users <= 80 and w.family in FAMILIES
    assert {sample_world(s).family for s in range(40)} == set(FAMILIES) - {"sunsea"}
    assert len(zoo("test")) >= 6 and len(zoo("heldout")) > len(zoo("tune")) // 2
    assert {w.family for w in zoo("test")} == set(FAMILIES) - {"sunsea"}


def test_independent_responses_put_no_word_kind_together():
    """"mixed" responses draw a topic mix each, so two sun words occur together more often than chance; in
    "independent" ones every word is drawn on its own, so they do not (what the "independent" split is for)."""
    from maxmin_jax.data.zoo import TOPICS

    def correlation(style):  # of the counts of two halves of the sun words, responses of one length
        world = zoo_world("lexical", num_groups=2, num_users=8, response_style=style, seed=0)
        prompts = world.prompts(4000, rng=1)
        words = [r.split() for r in world.candidates(prompts, rng=2)]
        first, second = (np.array([sum(w in half for w in ws) for ws in words], float)
                         for half in (TOPICS["sun"][:4], TOPICS["sun"][4:]))
        length = np.array([len(ws) for ws in words])
        common = length == np.bincount(length).argmax()
        return np.corrcoef(first[common], second[common])[0, 1]

    assert correlation("mixed") > 0.15
    assert correlation("independent") < 0.0  # given the length, one word taken is a slot the other cannot have
    assert {w.response_style for w in zoo("independent")} == {"independent"}
    assert {w.family for w in zoo("independent")} == set(FAMILIES)
    with pytest.raises(ValueError, match="response_style must be one of"):
        zoo_world("lexical", response_style="shuffled")


def test_oracle_and_labelling_model():
    clean = zoo_world("length", num_groups=2, num_users=20, pairs_per_user=16, noise=0.05, seed=1)
    assert clean.oracle_ari() == 1.0
    flipped = dataclass_replace(clean, flip_rate=0.3)
    rows = flipped.preference_rows()
    users, ll = flipped.label_log_likelihoods(rows)
    assert ll.shape == (20, 2) and len(users) == 20
    # A flip rate of 0.3 on near-deterministic labels: about 30% of the pairs disagree with the user's reward.
    gap = true_reward_gaps(flipped, rows)
    g = np.array([flipped.group_names.index(r.group) for r in rows])
    disagree = np.mean(gap[np.arange(len(rows)), g] < 0)
    assert 0.2 < disagree < 0.4
    noisy = dataclass_replace(clean, pairs_per_user=2, bt_temperature=5.0)
    assert noisy.oracle_ari() < 0.9  # two very noisy pairs per user do not tell the groups apart


def test_the_oracle_weighted_by_group_sizes_gives_weak_evidence_to_the_larger_group():
    """Held-out prompt #9 (60:4, nine noisy pairs per user): every minority user's labels favour the minority's
    true reward, but some by less than log(60 / 3) nats, so weighted by the group sizes (as a mixture weighs its
    groups) the true rewards themselves place them in the majority."""
    world = zoo("heldout")[9]
    rows = world.preference_rows()
    users, ll = world.label_log_likelihoods(rows)
    group = {r.user_id: world.group_names.index(r.group) for r in rows}
    sizes = np.bincount([group[u] for u in users])
    minority = int(np.argmin(sizes))
    evidence = np.array([ll[i, minority] - ll[i, 1 - minority] for i, u in enumerate(users) if group[u] == minority])
    assert world.oracle_ari(rows) == 1.0 and np.all(evidence > 0)
    weak = evidence < np.log(sizes.max() / (sizes.min() - 1))  # the prior odds against a minority user
    assert weak.any()
    weighted = world.oracle_assignments(rows, group_sizes=True)
    moved = [u for u in users if group[u] == minority and weighted[u] != minority]
    assert len(moved) == int(weak.sum())
    assert all(weighted[u] == group[u] for u in users if group[u] != minority)
    assert world.oracle_ari(rows, group_sizes=True) < 0.9


def dataclass_replace(world, **changes):
    import dataclasses

    return dataclasses.replace(world, **changes)


def test_worlds_refuse_bad_settings_and_factories():
    with pytest.raises(ValueError, match="unknown zoo family"):
        zoo_world("colours")
    with pytest.raises(ValueError, match="1 to 4 groups"):
        zoo_world("prompt", num_groups=5)
    with pytest.raises(ValueError, match="flip_rate"):
        zoo_world("lexical", flip_rate=0.6)
    with pytest.raises(ValueError, match="fewer than the 3 groups"):
        zoo_world("lexical", num_users=2)
    with pytest.raises(ValueError, match="unknown zoo split"):
        zoo("train")
    built = load_world("maxmin_jax.data.zoo:zoo_world", family="format", num_groups=2, num_users=8)
    assert isinstance(built, ZooWorld) and built.num_groups == 2
    with pytest.raises(ValueError, match="expected 'package.module:function'"):
        load_world("maxmin_jax.data.zoo.zoo_world")
    with pytest.raises(ValueError, match="has no function or class 'no_such_world'"):
        load_world("maxmin_jax.data.zoo:no_such_world")
    with pytest.raises(ValueError, match=r"without \['tokenizer'"):
        load_world(f"{__name__}:_incomplete_world")
    assert world_module.scale_sizes((6, 3, 1), 50) == (30, 15, 5)


def _incomplete_world():
    class Half:
        group_names = ("a",)

        def prompts(self, n, rng=None):
            return ["p"] * n

    return Half()
