"""Where the reward-model EM starts: the token-feature mixture, its feature set chosen by held-out users.

`feature_start` builds every candidate feature set (word clusters, single tokens or bigrams, prompt terms, word
clustering, length hinges, the response's openers and closers, the places of tokens, repetition, topics;
`features.pair_features`), fits the token-feature mixture on each (`init.fit_feature_mixture`, or one per K with
num_groups="auto") and keeps the one that predicts held-out users best. `starting_points` gives each restart's
initial responsibilities.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import TYPE_CHECKING

import numpy as np

from maxmin_jax.data.batching import PairBatch
from maxmin_jax.rewards.features import batch_word_clusters, disputed_positions, disputed_tokens, pair_features
from maxmin_jax.rewards.init import (FeatureMixture, KSelection, adjusted_rand, fit_feature_mixture,
                                     held_out_user_scores, initial_assignments, paired_standard_error,
                                     select_num_groups)

if TYPE_CHECKING:
    from maxmin_jax.rewards.em import EMConfig

EXTENSIONS = ("length_shape", "response_ends", "token_positions", "repetition", "prompt_topics")
"""EMConfig's features tried on the chosen candidate, in this order, each kept only when clearly better; each is a
flag of a candidate's key, after (clusters, tokens, token order, prompt terms, clustering seed)."""


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One candidate feature set: its features [N, d] (every pair), the token-feature mixture on the training pairs,
    and each user's log-likelihood [U] by which candidates are compared: held out of the mixture's fit
    (`init.held_out_user_scores`). With num_groups="auto" (a mixture per K, `selection`), a screen: the mixture
    and leave-one-user-out scores of the K that scores best so; K is then chosen on the chosen candidate alone."""

    x: np.ndarray
    mixture: FeatureMixture
    selection: KSelection | None
    user_scores: np.ndarray

    @property
    def score(self) -> float:
        return float(np.sum(self.user_scores))

    @property
    def assignments(self) -> np.ndarray:
        return self.mixture.assignments


def starting_points(config: EMConfig, k: int, num_users: int, restart: int, rng: np.random.Generator,
                    features: np.ndarray | None, user_index: np.ndarray, first_fit: FeatureMixture | None
                    ) -> tuple[np.ndarray, FeatureMixture | None]:
    if config.init == "features":
        fit = first_fit if restart == 0 and first_fit is not None else fit_feature_mixture(
            features, user_index, num_users, k, restarts=config.init_restarts, l2=config.feature_l2,
            seed=config.seed + restart, flip_rate=config.flip_rate_or_none)
        return fit.responsibilities, fit
    init = config.init if restart == 0 else "random"
    return np.eye(k, dtype=np.float32)[initial_assignments(num_users, k, init, rng)], None


def feature_start(everything: PairBatch, num_train_pairs: int, user_index: np.ndarray, num_users: int,
                  config: EMConfig):
    """Token features of `everything` (the batch's pairs, then any held-out ones) and the token-feature mixture
    on the batch's pairs, at config.num_groups or at the K chosen in k_range.

    Which features: every candidate (clusters, single tokens, the most frequent or the most disputed, prompt terms,
    word clustering) is fitted and scored by how well it predicts held-out users (`Candidate`: users held out of
    the fit by folds, each placed by half of their pairs and scored on the other half); of those within one
    standard error of the best, the one with the fewest columns is kept (`narrowest_near_the_best`). With
    num_groups="auto" (a fit per K), the word clusterings after the first are tried for the best candidate only.
    The chosen candidate with the most disputed tokens replaces the chosen one of the others only if it scores
    higher by more than one standard error (`_clearly_better`). The chosen one is then tried once more with the
    most disputed tokens and bigrams as its single-token columns (disputed_bigrams="auto"), with the length
    hinges (length_shape="auto"), with the response's openers and closers (response_ends="auto"), with the places
    of the tokens whose place users dispute most (token_positions="auto"), with how much the response repeats
    itself (repetition="auto") and with what the prompt is about times what the response is about
    (prompt_topics="auto"; also in place of its prompt terms), each kept on the same condition. A feature that
    tells no group apart still gets a noisy weight in every head and blurs which head predicts a user best, so
    fewer features win where they suffice.

    Why held-out users and not the mixture's own leave-one-user-out score: that score lets each user pick the
    head that fits all of their pairs best, among heads fitted to a partition the user helped choose, so it grows
    with the width of the features even where they say nothing of the groups. On unseen world 7
    (`benchmarks/unseen_worlds.py`) with its labels' signs drawn at random, the widest candidate's K=2 mixture
    gained 28 nats over K=1 by that score and 2 by held-out users; with the true labels, that candidate beat the
    places of 16 tokens by 9 nats (ARI 0.02 against 0.82) by the first and lost by 92 by the second.
    Returns (features, mixture, K selection or None, the chosen candidate as a dict, with every candidate's score
    and `rival_agreement`)."""
    prompt = {"on": [True], "off": [False], "auto": [False, True]}[config.prompt_features]

    clusterings = {}  # (clusters, seed) -> word cluster of every token, shared by that clustering's candidates
    token_orders = {"frequent": None}  # pair_features' default: the most widespread tokens
    if config.feature_disputed_tokens:  # ranked by the training labels: tokens alone unless disputed_bigrams="on",
        # with bigrams unless "off"
        for name, bigrams, wanted in (("disputed", False, config.disputed_bigrams != "on"),
                                      ("disputed_bigrams", True, config.disputed_bigrams != "off")):
            if wanted:
                token_orders[name] = disputed_tokens(everything, num_train_pairs, user_index, num_users,
                                                     bigrams=bigrams)
    disputed_order = "disputed_bigrams" if config.disputed_bigrams == "on" else "disputed"
    tokens = [(n, "frequent") for n in config.feature_tokens] + [(n, disputed_order)
                                                                  for n in config.feature_disputed_tokens]

    places = []  # the tokens whose place users dispute most, ranked once when first asked for

    def fit(clusters, tokens, token_order, prompt_terms, seed, shape, ends, positions, repeats, topics):
        if positions and not places:
            places.append(disputed_positions(everything, num_train_pairs, user_index, num_users)[
                :config.position_tokens])
        if (clusters, seed) not in clusterings:
            clusterings[clusters, seed] = batch_word_clusters(everything, clusters, seed=config.seed + seed)
        x = pair_features(everything, clusters=clusters, tokens=tokens, prompt_terms=prompt_terms,
                          length_knots=config.length_knots if shape else 0,
                          ends=config.response_end_tokens if ends else 0, labels=clusterings[clusters, seed],
                          token_order=token_orders[token_order], positions=places[0] if positions else None,
                          repeats=repeats, topics=topics)
        train = x[:num_train_pairs]
        if config.num_groups == "auto":  # screened by each K's leave-one-user-out score, the best K's
            selection = select_num_groups(train, user_index, num_users, config.k_range,
                                          restarts=config.init_restarts, l2=config.feature_l2, seed=config.seed)
            best = max(selection.ks, key=lambda k: selection.fits[k].score)
            return Candidate(x, selection.fits[best], selection, selection.fits[best].user_scores)
        mixture = fit_feature_mixture(train, user_index, num_users, config.num_groups,
                                      restarts=config.init_restarts, l2=config.feature_l2, seed=config.seed,
                                      flip_rate=config.flip_rate_or_none)
        held_out = held_out_user_scores(train, user_index, num_users, {mixture.num_groups: mixture},
                                        folds=min(config.user_folds, num_users), l2=config.feature_l2,
                                        seed=config.seed)
        return Candidate(x, mixture, None, held_out[mixture.num_groups])

    def usual(tokens, prompt_terms):  # the disputed tokens without the prompt terms unless those are "on": the
        # widest fits (the cost grows with the cube of the width), and on the zoo never chosen
        return tokens[1] == "frequent" or not prompt_terms or config.prompt_features == "on"

    on = tuple(getattr(config, name) == "on" for name in EXTENSIONS)
    if config.num_groups != "auto":
        fits = {(c, *t, p, s, *on): fit(c, *t, p, s, *on) for c, t, p, s in itertools.product(
            config.feature_clusters, tokens, prompt, range(config.feature_seeds)) if usual(t, p)}
    else:  # every K of k_range per candidate: the other word clusterings only for the best candidate
        fits = {(c, *t, p, 0, *on): fit(c, *t, p, 0, *on) for c, t, p in itertools.product(
            config.feature_clusters, tokens, prompt) if usual(t, p)}
        top = max(fits, key=lambda c: fits[c].score)[:4]
        fits.update({(*top, s, *on): fit(*top, s, *on) for s in range(1, config.feature_seeds)})

    def best(keys):
        return narrowest_near_the_best({c: fits[c] for c in keys})

    # The disputed tokens are ranked by the labels the score is computed on, so their candidates' scores are
    # optimistic: they replace the best of the others only when clearly better (on the zoo, a near-tie won by
    # 0.7 nats chose a partition at ARI 0.26 over one at 0.78).
    chosen = best([c for c in fits if c[2] == "frequent"])  # feature_tokens is never empty
    disputed = [c for c in fits if c[2] != "frequent"]
    if disputed and _clearly_better(fits[best(disputed)], fits[chosen]):
        chosen = best(disputed)
    # Tried on the best candidate only, one more fit each, not twice as many candidates: its single-token columns
    # replaced by the most disputed tokens and bigrams, then the length hinges, the response's ends, the places of
    # the tokens, the repetition and the topics. The topics say what the prompt terms say where clusters are
    # topics, and more, so they are also tried in place of the prompt terms (the narrower set wins where it
    # suffices): the better of the two variants is kept if clearly better.
    def variants_with(c, name):  # c with extension `name` on; the topics also in place of c's prompt terms
        i = 5 + EXTENSIONS.index(name)
        on = (*c[:i], True, *c[i + 1:])
        instead = name == "prompt_topics" and c[3] and config.prompt_features == "auto"
        return [on, (*on[:3], False, *on[4:])] if instead else [on]

    extensions = []
    if "disputed_bigrams" in token_orders and config.disputed_bigrams == "auto":
        extensions.append(lambda c: [(c[0], max(config.feature_disputed_tokens), "disputed_bigrams", *c[3:])])
    for name in EXTENSIONS:
        if getattr(config, name) == "auto":
            extensions.append(lambda c, name=name: variants_with(c, name))
    for extend in extensions:
        variants = extend(chosen)
        for extended in variants:
            if extended not in fits:
                fits[extended] = fit(*extended)
        extended = best(variants)
        if _clearly_better(fits[extended], fits[chosen]):
            chosen = extended
    agreement = rival_agreement(fits[chosen], [f for c, f in fits.items() if c != chosen])
    x, mixture, selection = fits[chosen].x, fits[chosen].mixture, fits[chosen].selection
    if config.num_groups == "auto":  # K by users held out of the fit, on the chosen features
        selection = select_num_groups(x[:num_train_pairs], user_index, num_users, config.k_range,
                                      restarts=config.init_restarts, l2=config.feature_l2, seed=config.seed,
                                      user_folds=config.user_folds, fits=selection.fits)
        mixture = selection.fits[selection.chosen]
        if config.flip_rate_or_none != 0.0:  # K was chosen without label flips (`select_num_groups`): add them now
            mixture = fit_feature_mixture(x[:num_train_pairs], user_index, num_users, selection.chosen,
                                          restarts=config.init_restarts, l2=config.feature_l2, seed=config.seed,
                                          start=mixture.assignments, flip_rate=config.flip_rate_or_none)
    names = ("clusters", "tokens", "token_order", "prompt_features", "clustering_seed", *EXTENSIONS)
    candidate = dict(zip(names, chosen))
    candidate["scores"] = [{**dict(zip(names, c)), "held_out_users_log_likelihood": f.score,
                            "leave_one_user_out_log_likelihood": f.mixture.score} for c, f in fits.items()]
    candidate["rivals"] = agreement
    return x, mixture, selection, candidate


def narrowest_near_the_best(candidates: dict) -> tuple:
    """The key of the candidate with the fewest feature columns among those the score cannot tell from the best
    (held-out users' log-likelihood lower by at most one standard error of the per-user differences), the higher
    score among equally wide ones: cross-validation's one-standard-error rule. A column that tells no group apart
    still gets a noisy weight in every head, and the best of many scores is biased upwards, so a near-tie won by a
    wider set is more often luck than signal (against the best score alone: docs/em.md, "The narrowest near the
    best")."""
    top = max(candidates, key=lambda c: candidates[c].score)
    near = [c for c, f in candidates.items() if not _clearly_better(candidates[top], f)]
    return min(near, key=lambda c: (candidates[c].x.shape[1], -candidates[c].score))


def rival_agreement(chosen: Candidate, others: list[Candidate]) -> dict:
    """The candidates the score cannot tell from the chosen one (held-out users' log-likelihood lower by at most
    one standard error of the per-user differences, or higher), and the lowest ARI between their partitions and
    the chosen one's (None without rivals). Where equally good feature sets group the users differently, the data
    do not settle the groups (`diagnostics.MIN_RIVAL_AGREEMENT`)."""
    rivals = [f for f in others if not _clearly_better(chosen, f)]
    lowest = min((adjusted_rand(chosen.assignments, f.assignments) for f in rivals), default=None)
    return {"count": len(rivals), "lowest_ari": lowest}


def _clearly_better(new: Candidate, old: Candidate) -> bool:
    """Whether `new` predicts held-out users better than `old` by more than one standard error of the per-user
    differences. The best of several candidates' scores is biased upwards, so a candidate tried on top of that
    best wins ties by luck: on the zoo the length hinges gained 54 and 78 nats where groups want a middle length
    and -9 to +0.3 elsewhere."""
    new_scores, old_scores = (np.asarray(m.user_scores, np.float64) for m in (new, old))
    return float(np.sum(new_scores - old_scores)) > paired_standard_error(new_scores, old_scores)


__all__ = ["Candidate", "feature_start", "narrowest_near_the_best", "rival_agreement", "starting_points"]
