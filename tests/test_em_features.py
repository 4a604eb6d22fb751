"""The token features of EM's start, by their arithmetic: the length hinges let a linear head prefer a length in the
middle (which the length column alone cannot), and they measure the response, not the prompt; the single-token
columns are the tokens users disagree about, not the most frequent ones, and with bigrams a phrase is a term of its
own."""

import numpy as np

from maxmin_jax.data.batching import PairBatch
from maxmin_jax.rewards.features import (disputed_positions, disputed_tokens, length_hinges, pair_features,
                                         prompt_topics, repetition, response_ends, term_counts,
                                         token_positions)


def _batch(pairs: list[tuple[list[int], list[int], list[int]]], user_index=None, groups=None) -> PairBatch:
    """(prompt, chosen response, rejected response) token ids -> a left-padded PairBatch (default: one user);
    `groups`: each user's true group, when a test scores the start's partition against it."""
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
    users = np.zeros(len(pairs), np.int32) if user_index is None else np.asarray(user_index, np.int32)
    return PairBatch(chosen_ids, chosen_mask, rejected_ids, rejected_mask, users,
                     tuple(f"u{i}" for i in range(int(users.max()) + 1)), None if groups is None else tuple(groups))


def _start(batch: PairBatch, **config) -> tuple[float, dict]:
    """The start's ARI against the batch's groups and its chosen candidate (`feature_start` at these EMConfig
    settings)."""
    from maxmin_jax.rewards.em import EMConfig
    from maxmin_jax.rewards.scoring import clustering_metrics
    from maxmin_jax.rewards.start import feature_start

    _, mixture, _, chosen = feature_start(batch, batch.num_pairs, batch.user_index, batch.num_users,
                                          EMConfig(progress=False, **config))
    return clustering_metrics(mixture.assignments, batch.groups)["ari"], chosen


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


def test_the_narrowest_candidate_near_the_best_is_chosen():
    """Of the candidates within one standard error of the best score, the one with the fewest feature columns; a
    wider one only where it predicts left-out users clearly better; equally wide ones by their score."""
    from types import SimpleNamespace

    from maxmin_jax.rewards.start import narrowest_near_the_best

    rng = np.random.default_rng(0)
    base = rng.normal(-20.0, 3.0, size=40)

    def candidate(width, gain):  # `gain` nats in total over `base`, per-user noise of spread 1 (paired SE about 9)
        noise = rng.normal(0.0, 1.0, size=40)
        scores = base + noise - noise.mean() + gain / 40
        return SimpleNamespace(x=np.zeros((5, width)), user_scores=scores, score=float(scores.sum()))

    narrow, wide_by_a_little, wide_by_far = candidate(9, 0.0), candidate(25, 3.0), candidate(41, 40.0)
    assert narrowest_near_the_best({"narrow": narrow, "wide": wide_by_a_little}) == "narrow"
    assert narrowest_near_the_best({"narrow": narrow, "wide": wide_by_a_little, "wider": wide_by_far}) == "wider"
    same_width = candidate(9, 2.0)
    assert narrowest_near_the_best({"a": narrow, "b": same_width}) == "b"


def test_rivals_are_the_feature_sets_the_score_cannot_tell_apart_and_disagreement_is_warned_about():
    """A candidate within one standard error of the chosen one's score is a rival, however it groups the users;
    one clearly worse is not. A fit whose rival groups the users otherwise (ARI below MIN_RIVAL_AGREEMENT) is
    warned about; one whose rivals agree, or that has none, is not."""
    from types import SimpleNamespace

    from maxmin_jax.rewards.diagnostics import MIN_RIVAL_AGREEMENT, fit_warnings
    from maxmin_jax.rewards.start import rival_agreement

    rng = np.random.default_rng(0)
    groups = np.repeat([0, 1], 20)
    user_scores = rng.normal(-20.0, 3.0, size=40)

    def mixture(assignments, shift):  # per-user scores shifted by `shift` nats in total, noise of spread 1
        noise = rng.normal(0.0, 1.0, size=40)
        scores = user_scores - (noise - noise.mean()) - shift / 40
        return SimpleNamespace(assignments=np.asarray(assignments), user_scores=scores, score=float(scores.sum()))

    chosen = SimpleNamespace(assignments=groups, user_scores=user_scores, score=float(user_scores.sum()))
    relabelled = mixture(1 - groups, 2.0)  # the same partition, other labels: 2 nats worse, SE about 6
    mixed_up = mixture(np.tile([0, 1], 20), 3.0)  # another partition, as good within the noise
    worse = mixture(np.tile([0, 1], 20), 60.0)  # another partition, far worse
    assert rival_agreement(chosen, [relabelled, worse]) == {"count": 1, "lowest_ari": 1.0}
    found = rival_agreement(chosen, [relabelled, mixed_up, worse])
    assert found["count"] == 2 and found["lowest_ari"] < 0.0
    assert rival_agreement(chosen, [worse]) == {"count": 0, "lowest_ari": None}

    def warnings(rivals):
        result = SimpleNamespace(assignments=groups, num_groups=2,
                                 diagnostics={"init": {"feature_set": {"rivals": rivals}}})
        return [w for w in fit_warnings(result) if "groups are uncertain" in w]

    assert len(warnings(found)) == 1 and "ARI down to" in warnings(found)[0]
    assert warnings({"count": 1, "lowest_ari": MIN_RIVAL_AGREEMENT + 0.05}) == []
    assert warnings({"count": 0, "lowest_ari": None}) == []


def test_disputed_tokens_rank_what_users_disagree_about_not_what_is_frequent():
    """Token 10: half the users prefer responses with it, half without (pooled, no preference at all). 11: every
    user prefers it (a strong pooled preference that tells no group apart). 12: in every pair, labelled at random.
    13: a rare token that half the users like. 14: in one user's pairs only."""
    rng = np.random.default_rng(0)
    pairs, users = [], []
    for user in range(8):
        likes_10 = user < 4
        for i in range(24):
            token = (10, 11)[i % 2] if i % 6 else 13
            if i % 6 == 0 and user == 0:
                token = 14
            wins = token == 11 or (token in (10, 13) and likes_10) or (token == 14)
            noise = [12] if rng.random() < 0.5 else []  # on one side or the other, at random
            fillers = rng.integers(50, 80, size=3).tolist()  # the other words, thinly spread
            with_token, without = [token, *fillers[:1]] + noise, fillers[1:] + ([] if noise else [12])
            pairs.append(([40], with_token, without) if wins else ([40], without, with_token))
            users.append(user)
    batch = _batch(pairs, users)
    order = disputed_tokens(batch, batch.num_pairs, batch.user_index, batch.num_users).tolist()
    assert order[:2] == [10, 13]  # the rare disputed token before the frequent agreed one
    assert order.index(11) > 1 and order.index(12) > 1
    assert 14 not in order and 40 not in order  # one user's token; the prompt (never differs within a pair)
    # Only the first `num_pairs` pairs' labels count (the rest are held out): with users 0-3 only, 10 is agreed on.
    first_half = int(np.searchsorted(batch.user_index, 4))
    order = disputed_tokens(batch, first_half, batch.user_index[:first_half], 4).tolist()
    assert order[0] not in (10, 13)
    # The columns follow the order given.
    x = pair_features(batch, clusters=2, tokens=2, token_order=np.array([13, 10]))
    diff = lambda t: np.array([c.count(t) - r.count(t) for _, c, r in pairs], np.float32)  # noqa: E731
    np.testing.assert_array_equal(x[:, -2:], np.stack([diff(13), diff(10)], axis=1))


def test_disputed_tokens_find_a_word_class_whose_words_never_occur_together():
    """The outside report's world (sun words, sea words, short answers) with every word drawn on its own: no word
    cluster holds the sun words, and the most frequent tokens are the fillers. The start finds most of the groups
    only when the most disputed tokens are among its candidates, and its score picks them. (Not all: single-token
    columns are no word class, docs/em.md.)"""
    from maxmin_jax.data.batching import tokenize_pairs
    from maxmin_jax.data.zoo import zoo_world

    world = zoo_world("sunsea", shares=(6, 3, 1), num_users=40, pairs_per_user=20, noise=1.0,
                      response_style="independent", seed=3)
    rows = world.preference_rows()
    assert world.oracle_ari(rows) == 1.0
    batch = tokenize_pairs(world.tokenizer(), rows, max_length=64)
    small = dict(num_groups=3, feature_clusters=(8,), feature_seeds=1, prompt_features="off",
                 length_shape="off", response_ends="off")  # a small screen: the word clusters' variants are not
    # what this is about
    ari = {}
    for disputed in ((), (32,)):
        ari[disputed], chosen = _start(batch, **small, feature_disputed_tokens=disputed)
    assert chosen["token_order"] == "disputed" and chosen["tokens"] == 32
    assert ari[(32,)] >= 0.7 and ari[()] < 0.4, ari  # measured: 0.82 and 0.20


def test_response_ends_mark_how_a_response_opens_and_closes():
    eos = 99
    pairs = [([40, 41], [1, 2, 3], [4, 5]),  # 1 and 4 only ever open, 3 only closes: their counts say it all
             ([40], [1, 7], [1, 8, 9]),  # both open with 1: the first word that differs (7 against 8) opens
             ([40, 41, 42], [5, 3], [6, 5, 9])]  # 5 opens one response and sits inside the other
    batch = _batch([(p, c + [eos], r + [eos]) for p, c, r in pairs])
    ends = response_ends(batch, 10)
    # Every (place, token) column but "opens with 5" repeats its token's count difference, so only that one is kept.
    np.testing.assert_array_equal(ends, [[0.0], [0.0], [1.0]])
    assert response_ends(batch, 0).shape == (3, 0)


def test_the_start_finds_groups_that_differ_only_in_how_answers_open():
    """Two groups who like answers that open with an affirmation or with a hedge; the same words also occur inside
    answers, where neither group cares about them. Counts of words cannot tell the groups apart; whether a word
    opens the response can, and the start adds those columns because they predict left-out users clearly better."""
    rng = np.random.default_rng(0)
    affirm, hedge, fillers = [1, 2, 3], [4, 5, 6], list(range(10, 40))
    pairs, users = [], []
    for user in range(24):
        likes = affirm if user % 2 == 0 else hedge
        for _ in range(32):
            a, b = ([int(rng.choice(affirm + hedge if rng.random() < 0.5 else fillers))]  # half open with either
                    + rng.choice(fillers[:12] + affirm + hedge, size=int(rng.integers(4, 9))).tolist() + [99]
                    for _ in range(2))
            margin = 3.0 * ((a[0] in likes) - (b[0] in likes))
            first = rng.random() < 1.0 / (1.0 + np.exp(-margin))
            pairs.append(([50 + int(rng.integers(5))], *((a, b) if first else (b, a))))
            users.append(user)
    batch = _batch(pairs, users, groups=[str(u % 2) for u in range(24)])
    small = dict(num_groups=2, feature_clusters=(8,), feature_tokens=(0,), feature_disputed_tokens=(),
                 feature_seeds=1, prompt_features="off", length_shape="off", token_positions="off")  # one candidate:
    # the others are not what this is about (the opening word's place would find these groups too)
    ari = {}
    for ends in ("off", "auto"):
        ari[ends], chosen = _start(batch, **small, response_ends=ends)
    assert chosen["response_ends"] is True
    assert ari["auto"] >= 0.9 and ari["off"] < 0.5, ari  # measured: 1.00 and 0.22


def test_term_counts_count_each_adjacent_token_pair_as_a_term():
    pairs = [([40], [1, 2, 1, 2], [2, 1]), ([40, 41], [3], [1, 2, 3])]
    batch = _batch(pairs)
    chosen, rejected, bigrams = term_counts(batch)
    chosen, rejected = chosen.toarray(), rejected.toarray()
    vocab = 42
    np.testing.assert_array_equal(chosen[:, :vocab], term_counts(batch, bigrams=False)[0].toarray())
    # Kept: as many bigrams as there are distinct tokens (5), those whose count differs within the most pairs,
    # ties by (a, b): (1, 2) differs in both pairs; (2, 1) and the prompt's (40, 41) in none, (41, 3) loses a tie.
    kept = [(1, 2), (2, 3), (40, 1), (40, 2), (41, 1)]
    assert chosen.shape == rejected.shape == (2, vocab + len(kept))
    assert [tuple(b) for b in bigrams.tolist()] == kept
    column = {b: vocab + i for i, b in enumerate(kept)}
    np.testing.assert_array_equal(chosen[:, column[1, 2]], [2, 0])
    np.testing.assert_array_equal(rejected[:, column[1, 2]], [0, 1])
    np.testing.assert_array_equal(chosen[:, column[40, 1]] - rejected[:, column[40, 1]], [1, 0])  # how it opens
    # pair_features takes a bigram's id as a single-token column: chosen minus rejected of the phrase.
    x = pair_features(batch, clusters=2, tokens=2, token_order=np.array([column[1, 2], 1]))
    np.testing.assert_array_equal(x[:, -2:], [[2, 1], [-1, -1]])


def test_the_start_finds_groups_that_differ_only_in_word_order():
    """Both groups like the same two words, one in the order "7 8", the other "8 7" (each phrase in 40% of the
    responses, the words also scattered on their own): token counts cannot tell the groups apart, bigrams can."""
    rng = np.random.default_rng(0)
    phrases = ([7, 8], [8, 7])

    def response():
        words = rng.choice(np.arange(20, 40), size=int(rng.integers(4, 8))).tolist()
        for w in rng.choice([7, 8], size=int(rng.integers(0, 3))).tolist():
            words.insert(int(rng.integers(len(words) + 1)), w)
        has = [rng.random() < 0.4 for _ in phrases]
        for phrase in (p for p, h in zip(phrases, has) if h):
            at = int(rng.integers(len(words) + 1))
            words[at:at] = phrase
        return words + [99], has

    pairs, users = [], []
    for user in range(24):
        for _ in range(32):
            (a, a_has), (b, b_has) = response(), response()
            margin = (2.0 * a_has[user % 2] - 0.5 * a_has[1 - user % 2]) - (2.0 * b_has[user % 2]
                                                                             - 0.5 * b_has[1 - user % 2])
            first = rng.random() < 1.0 / (1.0 + np.exp(-margin / 0.5))
            pairs.append(([50 + int(rng.integers(5))], *((a, b) if first else (b, a))))
            users.append(user)
    batch = _batch(pairs, users, groups=[str(u % 2) for u in range(24)])
    small = dict(num_groups=2, feature_clusters=(8,), feature_tokens=(0,),
                 feature_disputed_tokens=(16,), feature_seeds=1, prompt_features="off", length_shape="off",
                 response_ends="off", token_positions="off")  # two candidates: clusters alone, and with the
    # disputed terms
    ari = {}
    for bigrams in (False, True):
        ari[bigrams], _ = _start(batch, **small, disputed_bigrams="auto" if bigrams else "off")
    assert ari[True] >= 0.9 and ari[False] < 0.3, ari  # measured: 1.00 and -0.04


def test_token_positions_place_each_token_from_the_first_to_the_last():
    eos = 99
    # Responses after the shared prefix [40, 41] (the prompt) and [40, 1] (the prompt and a shared first word).
    pairs = [([40, 41], [1, 2, 3, 4], [4, 5]), ([40], [1, 7, 7], [1, 8])]
    batch = _batch([(p, c + [eos], r + [eos]) for p, c, r in pairs])
    chosen, rejected = (m.toarray() for m in token_positions(batch))
    # Four tokens stand at -3/4, -1/4, 1/4, 3/4; two at -1/2, 1/2; EOS and the prefix nowhere.
    np.testing.assert_allclose(chosen[0, [1, 2, 3, 4]], [-0.75, -0.25, 0.25, 0.75])
    np.testing.assert_allclose(rejected[0, [4, 5]], [-0.5, 0.5])
    np.testing.assert_allclose(chosen[1, 7], -0.5 + 0.5)  # the response after the shared "1": 7 at both places
    np.testing.assert_allclose(rejected[1, 8], 0.0)  # a one-token response: its token in the middle
    assert chosen[:, [40, 41, eos]].sum() == 0 and rejected[:, [40, 41, eos]].sum() == 0
    x = pair_features(batch, clusters=2, tokens=0, positions=np.array([4, 1]))
    np.testing.assert_allclose(x[:, -2:], [[0.75 + 0.5, -0.75], [0.0, 0.0]])


def test_repetition_counts_repeats_of_rare_words_in_the_response_alone():
    eos = 99
    # Prompt [40, 3]; token 3 is in every response (rarity 0), token 5 in one of four (rarity log 4).
    pairs = [([40, 3], [5, 5, 5, 3, 3], [6, 3]), ([40, 3], [3, 40, 7], [7, 3])]  # 40, 7 repeat the prompt, not
    # themselves
    batch = _batch([(p, c + [eos], r + [eos]) for p, c, r in pairs])
    rarity = {t: np.log(4 / n) for t, n in ((5, 1), (3, 4), (40, 1), (7, 2))}
    np.testing.assert_allclose(repetition(batch), [2 * rarity[5] + rarity[3], 0.0])
    x = pair_features(batch, clusters=2, tokens=0, repeats=True)
    np.testing.assert_allclose(x[:, -1], repetition(batch), rtol=1e-6)


def _repetition_world(seed: int = 0):
    """32 users who dislike an answer that repeats a word and 8 who like it (as `benchmarks/unseen_worlds.py`'s
    world 4, redundancy): every answer is 7 words, 4 to 7 of them distinct, drawn at random from 40, so its words
    and length say nothing about the group; how often it repeats them does."""
    rng = np.random.default_rng(seed)

    def response():
        distinct = rng.choice(np.arange(20, 60), size=int(rng.integers(4, 8)), replace=False).tolist()
        return rng.permutation(distinct + rng.choice(distinct, size=7 - len(distinct)).tolist()).tolist() + [99]

    def repeats(words):
        return len(words) - len(set(words))

    pairs, users, groups = [], [], ["concise"] * 32 + ["repetitive"] * 8
    for user, group in enumerate(groups):
        sign = 1.0 if group == "repetitive" else -1.0
        for _ in range(20):
            a, b = response(), response()
            first = rng.random() < 1.0 / (1.0 + np.exp(-sign * (repeats(a) - repeats(b))))
            pairs.append(([10 + int(rng.integers(5))], *((a, b) if first else (b, a))))
            users.append(user)
    return _batch(pairs, users, groups=groups)


def test_the_start_finds_groups_that_differ_only_in_how_much_answers_repeat_themselves():
    """No count of words tells the groups of `_repetition_world` apart; the repetition column does, and the start
    adds it because it predicts held-out users clearly better."""
    batch = _repetition_world()
    small = dict(num_groups=2, feature_clusters=(8,), feature_tokens=(0,), feature_disputed_tokens=(),
                 feature_seeds=1, prompt_features="off", length_shape="off", response_ends="off",
                 token_positions="off")  # one candidate
    ari = {}
    for repeats in ("off", "auto"):
        ari[repeats], chosen = _start(batch, **small, repetition=repeats)
    assert chosen["repetition"] is True
    assert ari["auto"] >= 0.9 and ari["off"] < 0.3, ari  # measured: 1.00 and -0.01 (seeds 1, 2: 1.00 / -0.05, -0.08)


def _topic_world(seed: int = 0, follow: float = 0.6):
    """16 users who like answers on the prompt's topic and 16 who like answers on the next topic (of three, in a
    cycle). Answers follow their prompt's topic (each of 6 words from it with probability `follow`, else from any
    of the three), so which words go with which prompts is in the data without labels. A word's count says nothing
    of the group; a word cluster's count where the prompt holds that cluster (the prompt terms) says "on topic"
    only."""
    rng = np.random.default_rng(seed)
    words = np.arange(20, 38).reshape(3, 6)  # each topic's words; prompt tokens 100 + 3 * topic + j

    def response(topic):
        return [int(rng.choice(words[topic if rng.random() < follow else rng.integers(3)])) for _ in range(6)] + [99]

    pairs, users, groups = [], [], ["on_topic", "next_topic"] * 16
    for user, group in enumerate(groups):
        for _ in range(24):
            topic = int(rng.integers(3))
            liked = set(words[topic if group == "on_topic" else (topic + 1) % 3].tolist())
            a, b = response(topic), response(topic)
            margin = sum(w in liked for w in a) - sum(w in liked for w in b)
            first = rng.random() < 1.0 / (1.0 + np.exp(-margin))
            pairs.append(([100 + 3 * topic + int(rng.integers(3))], *((a, b) if first else (b, a))))
            users.append(user)
    return _batch(pairs, users, groups=groups)


def test_prompt_topics_are_found_without_labels():
    batch = _topic_world()
    x = prompt_topics(batch)
    assert x.shape[1] == 4, x.shape  # two directions (three topics, centred), 2 x 2 products
    assert prompt_topics(_topic_world(follow=0.0)).shape[1] == 0  # answers that ignore the prompt: none


def test_the_start_finds_groups_that_differ_in_which_topic_they_want_for_a_prompt():
    """The topics' products express "the prompt's topic" and "the next one" alike, and the start adds them because
    they predict held-out users clearly better."""
    batch = _topic_world()
    small = dict(num_groups=2, feature_clusters=(8,), feature_tokens=(0,), feature_disputed_tokens=(),
                 feature_seeds=1, prompt_features="off", length_shape="off", response_ends="off",
                 token_positions="off", repetition="off")  # one candidate
    ari = {}
    for topics in ("off", "auto"):
        ari[topics], chosen = _start(batch, **small, prompt_topics=topics)
    assert chosen["prompt_topics"] is True
    assert ari["auto"] >= 0.9 and ari["off"] < 0.3, ari  # measured: 1.00 and -0.01 (seeds 1, 2: 1.00 / -0.02,
    # 0.87 / -0.01); with the prompt terms in place of the topics 0.55


def _advice_world(seed: int = 0):
    """Two groups of 16 users who both like "the advice" (token 7) in an answer, one where it comes first, the
    other where it comes last (as in `benchmarks/unseen_worlds.py`'s world 7): its count says nothing about the
    group, where it stands does."""
    rng = np.random.default_rng(seed)

    def response():
        words = rng.choice(np.arange(20, 40), size=int(rng.integers(3, 8))).tolist()
        if rng.random() < 0.7:
            words.insert(int(rng.integers(len(words) + 1)), 7)
        return words + [99]

    def reward(words, late):
        if 7 not in words:
            return 0.0
        place = words.index(7) / max(len(words) - 2, 1)  # 0: first, 1: last before EOS
        return 2.0 * (place - 0.5) * (1 if late else -1)

    pairs, users = [], []
    for user in range(32):
        for _ in range(24):
            a, b = response(), response()
            first = rng.random() < 1.0 / (1.0 + np.exp(-(reward(a, user % 2) - reward(b, user % 2)) / 0.5))
            pairs.append(([50 + int(rng.integers(5))], *((a, b) if first else (b, a))))
            users.append(user)
    return _batch(pairs, users, groups=[str(u % 2) for u in range(32)])


def test_the_place_users_dispute_most_is_the_word_whose_place_they_care_about():
    batch = _advice_world()
    assert disputed_positions(batch, batch.num_pairs, batch.user_index, batch.num_users)[0] == 7


def test_the_start_finds_groups_that_differ_only_in_where_a_word_stands():
    """Counts of words cannot tell the two groups of `_advice_world` apart; where the advice stands can, and the
    start adds those columns because they predict held-out users clearly better."""
    batch = _advice_world()
    small = dict(num_groups=2, feature_clusters=(8,), feature_tokens=(0,), feature_disputed_tokens=(),
                 feature_seeds=1, prompt_features="off", length_shape="off", response_ends="off")  # one candidate
    ari = {}
    for positions in ("off", "auto"):
        ari[positions], chosen = _start(batch, **small, token_positions=positions)
    assert chosen["token_positions"] is True
    assert ari["auto"] >= 0.9 and ari["off"] < 0.3, ari  # measured: 1.00 and 0.03 (seeds 1, 2: 1.00 / 0.02, 0.00)
