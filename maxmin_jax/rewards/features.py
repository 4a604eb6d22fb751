"""Pair features for EM's initialisation: what changed between the chosen and the rejected response.

A linear Bradley-Terry model needs few features to express what tells groups apart in most preference data:
"likes words of this kind", "dislikes those", "prefers shorter", "likes '!'". Words of a kind are found without
labels, from which words occur together in the responses (a spectral embedding of the token co-occurrence
correlations, clustered by k-means), so a group that likes sun words is one feature, not eight. `pair_features`
gives, for each pair, chosen minus rejected of:

- the count of each word cluster's tokens (`clusters` features),
- the length in tokens (1),
- the count of each of `tokens` single tokens on their own: by default the most widespread (punctuation, function
  words); `feature_start` passes the most disputed (`disputed_tokens`: the tokens users disagree about most), which
  finds the words a group cares about even where they do not occur together and so form no cluster; with
  `bigrams`, adjacent token pairs are ranked with the tokens (`term_counts`), so "step by step" counts apart from
  "step" and "by" elsewhere, and a word a subword tokenizer splits can be one term,
- with `length_knots`: hinges of the response's length at quantiles of all response lengths (`length_hinges`),
  so a head can prefer a length in the middle, not only longer or shorter,
- with `ends`: whether the response opens or closes with a token, for the `ends` most frequent such (token, place)
  (`response_ends`), so a head can prefer answers that begin "Sure, ..." over "Perhaps ..." wherever else those
  words occur,
- with `repetition`: how much the response repeats itself, rare words weighted up (`repetition`),
- with `topics`: what the prompt is about times what the response is about (`prompt_topics`): the products of
  the prompt's and the response's coordinates on the few directions along which prompts and their responses'
  words go together, so a head can prefer answers on the prompt's topic, or on the next one,
- with `prompt_terms`: for each cluster, whether the prompt uses it times the count difference (does the response
  stay with what was asked about?) and times the length difference (does the prompt ask for more or less?).

The prompt is the longest common prefix of the two sequences of a pair; it cancels in every difference.
"""

from __future__ import annotations

import numpy as np

from maxmin_jax.data.batching import PairBatch


def _sequence_counts(ids: np.ndarray, mask: np.ndarray, vocab: int):
    """Sparse [N, vocab] token counts of the real tokens of each row."""
    from scipy import sparse

    n, t = ids.shape
    return sparse.coo_matrix((mask.ravel().astype(np.float64), (np.repeat(np.arange(n), t), ids.ravel())),
                             shape=(n, vocab)).tocsr()


def _start_aligned(ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """[N, T] the real tokens of each left-padded row moved to its start, -1 after them."""
    t = ids.shape[1]
    length = mask.sum(1)
    index = (t - length)[:, None] + np.arange(t)[None]
    return np.where(np.arange(t)[None] < length[:, None], np.take_along_axis(ids, np.minimum(index, t - 1), 1), -1)


def _aligned_pairs(batch: PairBatch) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each pair's chosen and rejected sequence moved to its start (`_start_aligned`), and [N] the length of their
    longest common prefix: the prompt (a PairBatch does not mark where it ends), and any words both responses
    begin with."""
    a, b = _start_aligned(batch.chosen_ids, batch.chosen_mask), _start_aligned(batch.rejected_ids, batch.rejected_mask)
    return a, b, np.argmax((a != b) | (a < 0) | (b < 0), axis=1)  # the first place they differ or one ends


def _prompts(batch: PairBatch) -> list[np.ndarray]:
    """Each pair's shared prefix of real tokens (the prompt)."""
    a, _, prefix = _aligned_pairs(batch)
    return [row[:n] for row, n in zip(a, prefix)]


def _prompt_counts(prompts: list[np.ndarray], vocab: int):
    """Sparse [N, vocab] token counts of each pair's prompt."""
    from scipy import sparse

    rows = np.repeat(np.arange(len(prompts)), [len(p) for p in prompts])
    cols = np.concatenate(prompts) if prompts else np.zeros(0, np.int64)
    return sparse.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(len(prompts), vocab))


def _prompt_presence(prompts: list[np.ndarray], vocab: int):
    """Sparse [N, vocab] 0/1: tokens of each pair's prompt."""
    out = _prompt_counts(prompts, vocab)
    out.data[:] = 1.0
    return out


def _vocab_size(batch: PairBatch) -> int:
    """The largest token id of the batch + 1: the width of its token counts."""
    return int(max(batch.chosen_ids.max(), batch.rejected_ids.max())) + 1


def _response_counts(batch: PairBatch):
    """Sparse [N, vocab] token counts of each pair's chosen and of its rejected sequence (`_vocab_size`)."""
    vocab = _vocab_size(batch)
    return (_sequence_counts(batch.chosen_ids, batch.chosen_mask, vocab),
            _sequence_counts(batch.rejected_ids, batch.rejected_mask, vocab))


def term_counts(batch: PairBatch, bigrams: bool = True):
    """Sparse [N, vocab + B] counts of each pair's chosen and of its rejected sequence, and [B, 2] the bigrams:
    counts of its tokens (ids < vocab, as `_response_counts`) and, with `bigrams`, of adjacent token pairs (id
    vocab + b for the b-th row of the bigrams, in order of (first, second) token; B = 0 without). Only the
    bigrams whose count differs between the two responses of the most pairs are kept, as many as the batch has
    distinct tokens: there are far more bigrams than tokens, and among thousands of rare
    ones some look disputed by chance (seen by two users who happen to disagree), so bigrams get no more chances
    than tokens to crowd the ranking of `disputed_tokens`. A function of the batch alone."""
    from scipy import sparse

    chosen, rejected = _response_counts(batch)
    vocab = chosen.shape[1]
    if not bigrams:
        return chosen, rejected, np.zeros((0, 2), np.int64)
    codes = []  # per sequence [N, T - 1]: a * vocab + b for each adjacent (a, b) of real tokens, -1 elsewhere
    for ids, mask in ((batch.chosen_ids, batch.chosen_mask), (batch.rejected_ids, batch.rejected_mask)):
        a = _start_aligned(ids, mask).astype(np.int64)
        codes.append(np.where((a[:, :-1] >= 0) & (a[:, 1:] >= 0), a[:, :-1] * vocab + a[:, 1:], -1))
    flat = np.concatenate([c.ravel() for c in codes])
    distinct, column = np.unique(flat[flat >= 0], return_inverse=True)
    index = np.full(len(flat), -1)
    index[flat >= 0] = column
    rows = np.repeat(np.arange(batch.num_pairs), codes[0].shape[1])
    pairs = [sparse.csr_matrix((np.ones(int(np.sum(i >= 0))), (rows[i >= 0], i[i >= 0])),
                               shape=(batch.num_pairs, len(distinct))) for i in np.split(index, 2)]
    # Kept: the bigrams whose count differs within the most pairs (a prompt's bigrams never do).
    spread = (pairs[0] - pairs[1]).tocsc()
    spread.eliminate_zeros()
    tokens_used = int(np.sum(np.asarray((chosen + rejected).sum(axis=0)).ravel() > 0))
    kept = np.sort(np.argsort(-spread.getnnz(axis=0), kind="stable")[:tokens_used])
    chosen, rejected = (sparse.hstack([counts, p.tocsc()[:, kept]]).tocsr() for counts, p in zip((chosen, rejected),
                                                                                               pairs))
    return chosen, rejected, np.stack(np.divmod(distinct[kept], vocab), axis=1)


def response_ends(batch: PairBatch, num: int) -> np.ndarray:
    """[N, <= num] chosen minus rejected of "the response opens with token t" / "closes with t" (its last token
    before EOS), for the `num` most frequent (place, token) over all responses. A PairBatch does not mark where
    the prompt ends, so a response opens after the longest common prefix of the pair's two sequences: where both
    responses begin with the same words, at the first word that differs. A column that equals its token's count
    difference in every pair (a token that occurs nowhere else, e.g. a closing '?') adds nothing and is left out."""
    from scipy import sparse

    a, b, prefix = _aligned_pairs(batch)
    rows = np.arange(batch.num_pairs)
    ends = []  # per sequence: (opening token, closing token), -1 where the response has none after the prefix
    for x, length in ((a, batch.chosen_mask.sum(1)), (b, batch.rejected_mask.sum(1))):
        ends.append((np.where(prefix < length - 1, x[rows, prefix], -1),  # the last real token is EOS
                     np.where(length - 2 >= prefix, x[rows, np.maximum(length - 2, 0)], -1)))
    chosen, rejected = _response_counts(batch)
    vocab = chosen.shape[1]
    counts = (chosen - rejected).tocsr()

    def one_hot(tokens):
        hit = np.flatnonzero(tokens >= 0)
        return sparse.csr_matrix((np.ones(len(hit)), (hit, tokens[hit])), shape=(batch.num_pairs, vocab))

    columns, frequency = [], []
    for place in range(2):  # opens, closes
        diff = (one_hot(ends[0][place]) - one_hot(ends[1][place])).tocsc()
        repeats = (diff - counts).tocsc()
        repeats.eliminate_zeros()
        informative = (repeats.getnnz(axis=0) > 0) & (abs(diff).sum(axis=0).A.ravel() > 0)
        columns.append(diff[:, informative])
        frequency.append(np.bincount(np.concatenate([t[t >= 0] for t in (ends[0][place], ends[1][place])]),
                                     minlength=vocab)[informative])
    frequency = np.concatenate(frequency)
    top = np.argsort(-frequency, kind="stable")[:num]
    return np.asarray(sparse.hstack(columns).tocsc()[:, top].todense(), np.float64)


def disputed_tokens(batch: PairBatch, num_pairs: int, user_index: np.ndarray, num_users: int, *,
                    bigrams: bool = False) -> np.ndarray:
    """Token ids, the most disputed first: ranked by how far the users' preferences for a token (from the labels
    of the first `num_pairs` pairs, user_index [num_pairs]) differ more than chance would make them differ. With
    `bigrams`, adjacent token pairs are ranked with the tokens (ids past the vocabulary: `term_counts`), those
    more disputed than each of their two tokens: where the phrase, not its words, is what users disagree about
    ("in short" against "short" and "in" elsewhere). A bigram of a disputed word and any neighbour is that word's
    dispute again, diluted, and would take its place among the top columns.

    User u's preference for token v is e_uv = a_uv / s_uv, a_uv = sum over u's pairs of d (chosen minus rejected
    count of v), s_uv = sum of d^2, with variance (1 - e_v^2) / s_uv if every user shared the pooled preference
    e_v = sum a / sum s. Cochran's heterogeneity Q_v = sum_u s_uv (e_uv - e_v)^2 / (1 - e_v^2) is then about
    chi-square with (users who saw v differ) - 1 degrees of freedom; tokens are ranked by its z-score. A token
    all users like alike tells no group apart, however frequent; one that some like and others dislike, or only
    some care about, does, however rare. Tokens that differ in the pairs of fewer than two users come last."""
    chosen, rejected, pairs = term_counts(batch, bigrams)
    z = _dispute(chosen - rejected, num_pairs, user_index, num_users)
    vocab = z.size - len(pairs)
    z[vocab:] = np.where(z[vocab:] > np.maximum(z[pairs[:, 0]], z[pairs[:, 1]]), z[vocab:], -np.inf)
    return np.argsort(-z, kind="stable")[:int(np.sum(np.isfinite(z)))]


def disputed_positions(batch: PairBatch, num_pairs: int, user_index: np.ndarray, num_users: int) -> np.ndarray:
    """Token ids, those whose place in the response users disagree about most first (`token_positions`, ranked as
    `disputed_tokens` ranks counts): a group that wants the advice first and one that wants it last both like the
    advice, so its count is not disputed, but where it stands is."""
    chosen, rejected = token_positions(batch)
    z = _dispute(chosen - rejected, num_pairs, user_index, num_users, counts=False)
    return np.argsort(-z, kind="stable")[:int(np.sum(np.isfinite(z)))]


def _dispute(diff, num_pairs: int, user_index: np.ndarray, num_users: int, counts: bool = True) -> np.ndarray:
    """[columns] how far users' preferences for each column of `diff` (sparse [N, columns], chosen minus rejected;
    the first `num_pairs` rows are labelled, user_index [num_pairs]) differ more than chance would make them: the
    z-score of Cochran's Q (`disputed_tokens`), -inf for columns that differ in the pairs of fewer than two users.
    A label's variance is 1 - (e d)^2 at pooled preference e; for count differences (|d| >= 1, mostly 1) it is
    taken as 1 - e^2, otherwise (`counts=False`, |d| < 1 too) averaged over the column's differences."""
    from scipy import sparse

    diff = diff.tocsr()[:num_pairs]
    by_user = sparse.csr_matrix((np.ones(num_pairs), (np.asarray(user_index), np.arange(num_pairs))),
                                shape=(num_users, num_pairs))
    a = (by_user @ diff).tocsr()  # [U, columns], sparse: memory O(pairs' tokens), not O(users * vocab)
    s = (by_user @ diff.multiply(diff)).tocsr()
    total_a, total_s = (np.asarray(m.sum(axis=0)).ravel() for m in (a, s))
    pooled = total_a / np.maximum(total_s, 1e-12)
    # sum_u s (a/s - pooled)^2 = sum_u a^2/s - total_a^2/total_s (a != 0 only where s != 0)
    spread = np.asarray(a.multiply(a).multiply(s.power(-1)).sum(axis=0)).ravel() - total_a * pooled
    if counts:
        q = spread / np.maximum(1.0 - pooled ** 2, 1e-6)
    else:  # 1 - e^2 sum d^4 / sum d^2
        fourth = np.asarray(diff.power(4).sum(axis=0)).ravel()
        q = spread / np.maximum(1.0 - pooled ** 2 * fourth / np.maximum(total_s, 1e-12), 1e-6)
    dof = s.getnnz(axis=0) - 1.0
    return np.where(dof >= 1, (q - dof) / np.sqrt(2.0 * np.maximum(dof, 1.0)), -np.inf)


def token_positions(batch: PairBatch):
    """Sparse [N, vocab] of each pair's chosen and of its rejected response: for each token, the sum over its
    occurrences of where it stands, from -1 (the response's first token) to +1 (its last before EOS). The response
    starts after the longest common prefix of the pair's two sequences (`response_ends`). Chosen minus rejected,
    with the token's count, lets a head prefer a token early or late, whatever else the response holds."""
    from scipy import sparse

    a, b, prefix = _aligned_pairs(batch)
    vocab = _vocab_size(batch)
    out = []
    for ids, length in ((a, batch.chosen_mask.sum(1)), (b, batch.rejected_mask.sum(1))):
        place = np.arange(ids.shape[1])[None] - prefix[:, None]
        span = np.maximum(length - 1 - prefix, 1)[:, None]  # the response's tokens before EOS
        rows, cols = np.nonzero((place >= 0) & (place < span))
        where = 2.0 * (place[rows, cols] + 0.5) / span[rows, 0] - 1.0
        out.append(sparse.csr_matrix((where, (rows, ids[rows, cols])), shape=(batch.num_pairs, vocab)))
    return out[0], out[1]


def _own_counts(batch: PairBatch, prompts: list[np.ndarray]):
    """Sparse [N, vocab] token counts of each pair's chosen and of its rejected response without its prompt."""
    chosen, rejected = _response_counts(batch)
    prompt_counts = _prompt_counts(prompts, chosen.shape[1])
    own = [(counts - prompt_counts).tocsr() for counts in (chosen, rejected)]
    for m in own:
        m.eliminate_zeros()
    return own


def repetition(batch: PairBatch) -> np.ndarray:
    """[N] chosen minus rejected of how much the response repeats itself: the sum over its tokens of their
    occurrences after the first, each weighted by its rarity, -log(the share of responses that hold it). Repeating
    a rare word is redundancy ("the soil ... the soil ... good soil"); repeating "the" or "." is grammar, and a
    count of all repeats would be mostly the response's length. The prompt's tokens are not counted (a response
    that echoes the prompt does not repeat itself)."""
    own = _own_counts(batch, _prompts(batch))
    held = (own[0] > 0).astype(np.float64) + (own[1] > 0).astype(np.float64)
    share = np.asarray(held.sum(axis=0)).ravel() / (2 * batch.num_pairs)
    rarity = -np.log(np.maximum(share, 1.0 / (2 * batch.num_pairs)))

    def repeats(m):
        m = m.astype(np.float64)
        m.data = np.maximum(m.data - 1.0, 0.0)
        return m @ rarity

    return repeats(own[0]) - repeats(own[1])


def prompt_topics(batch: PairBatch, *, max_topics: int = 6, max_vocab: int = 1024, nulls: int = 3,
                  seed: int = 0) -> np.ndarray:
    """[N, k * k] chosen minus rejected of (the prompt's coordinate i) x (the response's coordinate j) for the k
    directions along which prompts and their responses' words go together, without labels: the singular vectors of
    the correlation between a prompt's tokens (0/1) and its responses' token counts (the prompt's own tokens taken
    out), over the `max_vocab` most widespread tokens of each side. k counts the singular values above the largest
    one of `nulls` copies with the prompts shuffled across pairs (what chance alone correlates), at most
    `max_topics`; 0 columns where none is. Where responses follow their prompt's topic, these directions are the
    topics, and the k * k products let a head prefer the prompt's topic, or another topic for each, which the
    prompt terms (a word cluster's count where the prompt holds that cluster) can say only where clusters are
    topics. Memory O(N * tokens per pair + max_vocab^2)."""
    from scipy import sparse

    prompts = _prompts(batch)
    own = _own_counts(batch, prompts)
    present = _prompt_presence(prompts, own[0].shape[1])

    def widest(m):  # the most widespread columns that vary
        spread = np.asarray((m > 0).sum(axis=0)).ravel()
        order = np.argsort(-spread, kind="stable")[:max_vocab]
        return order[(spread[order] > 0) & (spread[order] < m.shape[0])]

    responses = sparse.vstack(own).tocsr()
    p_cols, r_cols = widest(present), widest(responses)
    if len(p_cols) == 0 or len(r_cols) == 0:
        return np.zeros((batch.num_pairs, 0), np.float64)
    r = responses[:, r_cols]
    r_mean = np.asarray(r.mean(axis=0)).ravel()
    r_std = np.sqrt(np.maximum(np.asarray(r.multiply(r).mean(axis=0)).ravel() - r_mean ** 2, 1e-12))

    def correlation(p):  # [p_cols, r_cols] between each response's prompt tokens p [N, .] and its counts
        both = sparse.vstack([p, p]).tocsr()
        p_mean = np.asarray(both.mean(axis=0)).ravel()
        p_std = np.sqrt(np.maximum(p_mean - p_mean ** 2, 1e-12))  # 0/1 columns
        cov = np.asarray((both.T @ r).todense()) / both.shape[0] - np.outer(p_mean, r_mean)
        return cov / np.outer(p_std, r_std), p_mean

    p = present[:, p_cols].astype(np.float64)
    corr, p_mean = correlation(p)
    u, s, vt = np.linalg.svd(corr, full_matrices=False)
    rng = np.random.default_rng(seed)
    chance = max(np.linalg.svd(correlation(p[rng.permutation(batch.num_pairs)])[0], compute_uv=False)[0]
                 for _ in range(nulls))
    k = min(int(np.sum(s > chance)), max_topics)
    prompt_side = np.asarray(p @ u[:, :k]) - p_mean @ u[:, :k]  # [N, k]
    response_side = np.asarray((own[0] - own[1])[:, r_cols] @ (vt[:k].T / r_std[:, None]))  # [N, k]
    return (prompt_side[:, :, None] * response_side[:, None, :]).reshape(batch.num_pairs, k * k)


def length_hinges(chosen: np.ndarray, rejected: np.ndarray, knots: int) -> np.ndarray:
    """[N, knots]: chosen minus rejected of max(0, length - q_j), q_j the j/(knots+1) quantiles of all response
    lengths. With the length column, a linear head then represents any piecewise-linear reward of length with
    bends at the knots, e.g. a preferred length in the middle (-|length - q|), which no linear term can."""
    lengths = np.concatenate([chosen, rejected]).astype(np.float64)
    q = np.unique(np.quantile(lengths, np.arange(1, knots + 1) / (knots + 1)))
    return np.maximum(chosen[:, None] - q, 0.0) - np.maximum(rejected[:, None] - q, 0.0)


def word_clusters(counts, num_clusters: int, *, embedding_dim: int = 16, max_vocab: int = 2048, seed: int = 0,
                  kmeans_restarts: int = 8) -> np.ndarray:
    """Cluster id [vocab] of every token from sequence counts [docs, vocab]: k-means on the rows of the top
    eigenvectors of the token-token correlation matrix over the `max_vocab` most widespread tokens. Tokens that
    never occur get cluster -1; occurring tokens outside `max_vocab` share cluster `num_clusters` (the rest)."""
    from maxmin_jax.rewards.linear_mixture import kmeans_plus_plus

    docs, vocab = counts.shape
    spread = np.asarray((counts > 0).sum(axis=0)).ravel()
    order = np.argsort(-spread, kind="stable")
    kept = order[:max_vocab][spread[order[:max_vocab]] > 0]
    labels = np.full(vocab, -1, np.int64)
    labels[spread > 0] = num_clusters
    if len(kept) <= num_clusters:  # fewer tokens than clusters: each its own
        labels[kept] = np.arange(len(kept))
        return labels
    sub = counts[:, kept]
    mean = np.asarray(sub.mean(axis=0)).ravel()
    cov = np.asarray((sub.T @ sub).todense()) / docs - np.outer(mean, mean)
    std = np.sqrt(np.maximum(np.diag(cov), 1e-12))
    corr = cov / np.outer(std, std)
    eigvals, eigvecs = np.linalg.eigh(corr)
    dim = min(embedding_dim, len(kept))
    emb = eigvecs[:, -dim:] * np.sqrt(np.maximum(eigvals[-dim:], 0.0))
    emb /= np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    rng = np.random.default_rng(seed)
    best, best_inertia = None, np.inf
    for _ in range(kmeans_restarts):
        lab = kmeans_plus_plus(emb, num_clusters, rng)
        centres = np.stack([emb[lab == c].mean(axis=0) for c in range(num_clusters)])
        inertia = float(((emb - centres[lab]) ** 2).sum())
        if inertia < best_inertia:
            best, best_inertia = lab, inertia
    labels[kept] = best
    return labels


def batch_word_clusters(batch: PairBatch, clusters: int, *, embedding_dim: int = 16, max_vocab: int = 2048,
                        seed: int = 0) -> np.ndarray:
    """`word_clusters` of the responses of `batch` (chosen and rejected): cluster id [vocab] of every token."""
    from scipy import sparse

    counts = sparse.vstack(_response_counts(batch)).tocsr()
    return word_clusters(counts, clusters, embedding_dim=embedding_dim, max_vocab=max_vocab, seed=seed)


def pair_features(batch: PairBatch, *, clusters: int = 16, tokens: int = 16, prompt_terms: bool = False,
                  length_knots: int = 0, ends: int = 0, embedding_dim: int = 16, max_vocab: int = 2048,
                  seed: int = 0, labels: np.ndarray | None = None, token_order: np.ndarray | None = None,
                  positions: np.ndarray | None = None, repeats: bool = False,
                  topics: bool = False) -> np.ndarray:
    """[N, d] float32 features of each pair (module docstring): d <= clusters + 1 + tokens (+ 2 * clusters with
    `prompt_terms`, + `length_knots`, + `ends`, + len(`positions`), + 1 with `repeats`, + up to 36 with `topics`);
    columns that are zero for every pair are dropped. `positions`: token ids whose place in the response is a column
    each (`token_positions`). `labels`: the word clusters (`batch_word_clusters` with the same `clusters`), when
    several feature sets share one clustering.
    `token_order`: token ids whose first `tokens` are the single-token columns (e.g. `disputed_tokens`; ids past
    the vocabulary are bigrams, `term_counts`); default the most widespread tokens. Memory O(N * tokens per pair
    + max_vocab^2)."""
    from scipy import sparse

    if batch.num_pairs == 0:
        raise ValueError("pair_features: no pairs")
    vocab = _vocab_size(batch)
    bigrams = token_order is not None and bool(np.any(np.asarray(token_order)[:tokens] >= vocab))
    chosen, rejected, _ = term_counts(batch, bigrams)  # bigram columns only when token_order asks for them
    diff = terms = (chosen - rejected).tocsr()
    if bigrams:  # the clusters and the default order are of tokens
        chosen, rejected, diff = chosen[:, :vocab], rejected[:, :vocab], terms[:, :vocab]
    if labels is None:
        labels = word_clusters(sparse.vstack([chosen, rejected]).tocsr(), clusters, embedding_dim=embedding_dim,
                               max_vocab=max_vocab, seed=seed)
    width = clusters + 1  # the clusters and "the rest"
    member = sparse.csr_matrix((np.ones(int(np.sum(labels >= 0))), (np.flatnonzero(labels >= 0),
                                                                    labels[labels >= 0])), shape=(vocab, width))
    by_cluster = np.asarray((diff @ member).todense())[:, :clusters]
    length = (batch.chosen_mask.sum(1) - batch.rejected_mask.sum(1)).astype(np.float64)[:, None]
    if token_order is None:
        spread = np.asarray(((chosen > 0) + (rejected > 0)).sum(axis=0)).ravel()
        token_order = np.argsort(-spread, kind="stable")
        token_order = token_order[spread[token_order] > 0]
    columns = [by_cluster, length, np.asarray(terms[:, np.asarray(token_order)[:tokens]].todense())]
    prompts = _prompts(batch) if prompt_terms or length_knots else None
    if length_knots:  # of the responses alone: the prompt's length would blur where the bends are
        prompt_length = np.array([len(p) for p in prompts])
        columns.append(length_hinges(batch.chosen_mask.sum(1) - prompt_length,
                                     batch.rejected_mask.sum(1) - prompt_length, length_knots))
    if ends:
        columns.append(response_ends(batch, ends))
    if positions is not None and len(positions):
        places = token_positions(batch)
        columns.append(np.asarray((places[0] - places[1]).tocsc()[:, np.asarray(positions)].todense()))
    if repeats:
        columns.append(repetition(batch)[:, None])
    if topics:
        columns.append(prompt_topics(batch, seed=seed))
    if prompt_terms:
        in_prompt = np.asarray((_prompt_presence(prompts, vocab) @ member).todense())[:, :clusters] > 0
        columns += [in_prompt * by_cluster, in_prompt * length]
    x = np.concatenate(columns, axis=1)
    keep = np.any(x != 0, axis=0)  # e.g. prompt terms of clusters no prompt uses
    return x[:, keep if keep.any() else slice(0, 1)].astype(np.float32)


__all__ = ["batch_word_clusters", "disputed_positions", "disputed_tokens", "length_hinges", "pair_features",
           "prompt_topics", "repetition", "response_ends", "term_counts", "token_positions", "word_clusters"]
