"""Synthetic preference worlds with known ground truth, shaped like the paper's GPT-2 / IMDB experiment.

Texts are short movie reviews from a closed vocabulary, so a word-level tokenizer covers them exactly and every
group's true reward is a sum of per-word values: computable on text (numpy) and on token ids (jnp, jittable) with
the same table, so policies can be scored by the truth inside a jitted loop.

- ``ReviewWorld``: a majority that likes enthusiastic reviews (positive words minus negative words, not normalised
  by length) and a minority that likes short ones (minus the number of words). Enthusiastic reviews are longer, so
  the two rewards conflict, as in the paper's sentiment-vs-conciseness experiment.
- ``planted_world``: G groups, each with its own hidden linear preference over word categories; for checking that
  EM recovers planted clusters.

Both implement the world protocol (`maxmin_jax.data.world`): users label pairs of candidate responses with
Bradley-Terry noise, a is chosen with P = sigmoid((r_g(a) - r_g(b)) / T), optionally with labels flipped at random.
The EM zoo (`maxmin_jax.data.zoo`) holds more worlds, of several families.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING

import jax.numpy as jnp
import numpy as np

from maxmin_jax.data.tokenizer import EOS, PAD, UNK, build_word_tokenizer
from maxmin_jax.data.world import RngLike, SyntheticWorld, scale_sizes

if TYPE_CHECKING:  # transformers is imported by whoever builds the tokenizer
    from transformers import PreTrainedTokenizerFast

NOUNS = ("movie", "film", "plot", "acting", "story", "ending", "cast", "music", "script", "director", "scenes",
         "dialogue")
POSITIVE = ("great", "wonderful", "brilliant", "amazing", "excellent", "beautiful", "superb", "fantastic",
            "delightful", "charming", "moving", "fun")
NEGATIVE = ("boring", "awful", "dull", "terrible", "bad", "weak", "poor", "predictable", "slow", "messy", "bland",
            "forgettable")
INTENSIFIERS = ("very", "really", "quite", "so", "truly")
FILLERS = ("the", "was", "and", "but", "i", "found", "this", "review", ":")
PUNCTUATION = (".",)
# Word categories, in the order of the planted worlds' feature weights.
CATEGORIES = {"positive": POSITIVE, "negative": NEGATIVE, "noun": NOUNS, "intensifier": INTENSIFIERS,
              "filler": FILLERS, "punctuation": PUNCTUATION}
FEATURE_NAMES = tuple(CATEGORIES)
VOCABULARY = tuple(dict.fromkeys(w for words in CATEGORIES.values() for w in words))
PROMPTS = ("review : the movie", "review : the film", "review : this movie", "review : this film",
           "review : the story")
_WORD = re.compile(r"\w+|[^\w\s]+")  # what the Whitespace pre-tokenizer splits on
_TOKEN_OF = {w: i for i, w in enumerate(VOCABULARY)}

def _pick(rng: np.random.Generator, words: Sequence[str]) -> str:
    return words[int(rng.integers(len(words)))]


def _adjective(rng: np.random.Generator, sentiment: float) -> str:
    return _pick(rng, POSITIVE if rng.random() < sentiment else NEGATIVE)


def _phrase(rng: np.random.Generator, sentiment: float) -> str:
    """An adjective, intensified more often by enthusiastic reviewers."""
    adj = _adjective(rng, sentiment)
    return f"{_pick(rng, INTENSIFIERS)} {adj}" if rng.random() < 0.6 * sentiment else adj


def _sentence(rng: np.random.Generator, s: float) -> str:
    kind = int(rng.integers(5))
    if kind == 0:
        return f"the {_pick(rng, NOUNS)} was {_phrase(rng, s)} ."
    if kind == 1:
        return f"{_adjective(rng, s)} {_pick(rng, NOUNS)} ."
    if kind == 2:
        return f"the {_pick(rng, NOUNS)} was {_phrase(rng, s)} and {_adjective(rng, s)} ."
    if kind == 3:
        return f"i found the {_pick(rng, NOUNS)} {_phrase(rng, s)} ."
    return f"the {_pick(rng, NOUNS)} was {_adjective(rng, s)} but the {_pick(rng, NOUNS)} was {_adjective(rng, s)} ."


def _response(rng: np.random.Generator) -> str:
    """A continuation of a prompt like "review : the movie": one clause, then 0..3 sentences.

    A latent sentiment s ~ U(0, 1) sets each adjective's polarity and how much is said (Binomial(3, s) extra
    sentences), so enthusiastic reviews are longer: this is what makes "positive" and "concise" conflict.
    """
    s = float(rng.random())
    first = f"was {_phrase(rng, s)} and {_adjective(rng, s)} ." if rng.random() < 0.3 else f"was {_phrase(rng, s)} ."
    return " ".join([first] + [_sentence(rng, s) for _ in range(int(rng.binomial(3, s)))])


def _word_counts(texts: Sequence[str]) -> np.ndarray:
    """[N, V + 1] word counts over VOCABULARY, last column = unknown words."""
    counts = np.zeros((len(texts), len(VOCABULARY) + 1), dtype=np.float32)
    for n, text in enumerate(texts):
        for word in _WORD.findall(text):
            counts[n, _TOKEN_OF.get(word, len(VOCABULARY))] += 1
    return counts


@functools.lru_cache(maxsize=1)
def _tokenizer_ids() -> tuple[int, int, int, tuple[int, ...]]:
    """(pad, eos, unk, id of each VOCABULARY word) in the world tokenizer."""
    vocab = build_word_tokenizer(VOCABULARY).get_vocab()
    return vocab[PAD], vocab[EOS], vocab[UNK], tuple(vocab[w] for w in VOCABULARY)


def rewards_from_token_table(ids: jnp.ndarray, mask: jnp.ndarray, table: jnp.ndarray, eos_id: int) -> jnp.ndarray:
    """Sums per-token values ``table [V, G]`` over the real tokens of each row, up to and including the first EOS.

    Tokens after the first EOS (generation pads or keeps sampling there) and masked tokens count zero; ids beyond
    the table (a model vocabulary larger than the world's) count as the last row, the unknown word. -> [B, G].
    """
    ids = jnp.asarray(ids)
    is_eos = ids == eos_id
    before_first_eos = (jnp.cumsum(is_eos, axis=-1) - is_eos) == 0
    valid = (jnp.asarray(mask) > 0) & before_first_eos
    unk = table.shape[0] - 1
    values = table[jnp.where((ids >= 0) & (ids < unk), ids, unk)]  # [B, T, G]
    return jnp.sum(jnp.where(valid[..., None], values, 0.0), axis=1)


class _WordWorld(SyntheticWorld):
    """The review worlds' shared parts; subclasses give ``group_names``, ``group_sizes`` and ``_word_values()``.

    Rewards depend on the response only (the prompt is a review opening that every group treats alike)."""

    def _word_values(self) -> np.ndarray:
        """[V + 1, G] true reward of each VOCABULARY word for each group; last row = unknown word."""
        raise NotImplementedError

    def tokenizer(self) -> PreTrainedTokenizerFast:
        """A fresh word-level tokenizer covering every text the world produces."""
        return build_word_tokenizer(VOCABULARY)

    def true_rewards_text(self, responses: Sequence[str]) -> np.ndarray:
        """[N, G] true reward of each response (the text after the prompt) for each group."""
        return _word_counts(responses) @ self._word_values()

    def true_rewards(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
        """[N, G]; the world protocol's form of ``true_rewards_text`` (prompts do not matter here)."""
        return self.true_rewards_text(responses)

    def token_table(self) -> np.ndarray:
        """[V_tok + 1, G] per-token reward table over the world tokenizer's ids; the last row is "<unk>"'s value,
        used for ids the tokenizer does not have. Pad and EOS are not words and are worth 0."""
        pad, eos, unk, word_ids = _tokenizer_ids()
        values = self._word_values()
        table = np.zeros((max(pad, eos, unk, *word_ids) + 2, self.num_groups), dtype=np.float32)
        table[list(word_ids)] = values[:-1]
        table[unk] = table[-1] = values[-1]
        return table

    def true_rewards_ids(self, ids: jnp.ndarray, mask: jnp.ndarray) -> jnp.ndarray:
        """[B, G] true rewards of response token ids ``[B, T]`` (world tokenizer) with mask ``[B, T]``; jittable.

        Counts real tokens up to the first EOS; equals ``true_rewards_text`` on the decoded responses.
        """
        return rewards_from_token_table(ids, mask, jnp.asarray(self.token_table()), _tokenizer_ids()[1])

    def prompts(self, n: int, rng: RngLike = None) -> list[str]:
        """``n`` review openings, e.g. "review : the movie"."""
        rng = np.random.default_rng(rng)
        return [_pick(rng, PROMPTS) for _ in range(n)]

    def candidates(self, prompts: Sequence[str], rng: RngLike = None) -> list[str]:
        """One response per prompt (the responses do not depend on the prompt)."""
        rng = np.random.default_rng(rng)
        return [_response(rng) for _ in prompts]

    def sample_responses(self, n: int, rng: RngLike = None) -> list[str]:
        """``n`` responses (continuations of a prompt), 1 to 4 sentences long."""
        rng = np.random.default_rng(rng)
        return [_response(rng) for _ in range(n)]

    def sample_reviews(self, n: int, rng: RngLike = None) -> list[str]:
        """``n`` full reviews, prompt + " " + response: the SFT corpus."""
        rng = np.random.default_rng(rng)
        return [f"{_pick(rng, PROMPTS)} {_response(rng)}" for _ in range(n)]


@dataclasses.dataclass(frozen=True, kw_only=True)
class ReviewWorld(_WordWorld):
    """Majority "positive" (reward = #positive words - #negative words) vs minority "concise" (reward = -#words).

    Attributes:
      num_users: users in both groups together.
      majority_share: fraction of users in the majority; 10/11 is the paper's 10:1 ratio. Each group keeps at
        least one user.
      pairs_per_user: labelled pairs per user.
      bt_temperature: Bradley-Terry temperature of the labels (0: noiseless). Rewards are in word counts, so at 1.0
        a one-word difference is chosen correctly 73% of the time, three words 95%.
      flip_rate: fraction of labels flipped at random on top of that.
      seed: fixes the user-group assignment and the default label sampling.
    """

    num_users: int = 110
    majority_share: float = 10 / 11
    pairs_per_user: int = 16
    bt_temperature: float = 1.0
    flip_rate: float = 0.0
    seed: int = 0

    group_names = ("positive", "concise")

    def __post_init__(self) -> None:
        if self.num_users < 2:
            raise ValueError(f"num_users must be >= 2 (one per group), got {self.num_users}")
        if not 0.0 < self.majority_share < 1.0:
            raise ValueError(f"majority_share must be in (0, 1), got {self.majority_share}")
        self.check_labelling()

    @property
    def group_sizes(self) -> tuple[int, int]:
        minority = min(max(1, round(self.num_users * (1.0 - self.majority_share))), self.num_users - 1)
        return self.num_users - minority, minority

    def _word_values(self) -> np.ndarray:
        values = np.zeros((len(VOCABULARY) + 1, 2), dtype=np.float32)
        for word in POSITIVE:
            values[_TOKEN_OF[word], 0] = 1.0
        for word in NEGATIVE:
            values[_TOKEN_OF[word], 0] = -1.0
        values[:, 1] = -1.0  # every word, unknown ones included, costs the concise group one unit
        return values


@dataclasses.dataclass(frozen=True, kw_only=True)
class PlantedWorld(_WordWorld):
    """G groups; group g's reward is ``weights[g] @ (count of words in each category of FEATURE_NAMES)``.

    Build with ``planted_world``, which picks weights that make the groups clearly distinguishable.
    """

    group_sizes: tuple[int, ...]
    weights: tuple[tuple[float, ...], ...]
    pairs_per_user: int = 24
    bt_temperature: float = 0.5
    flip_rate: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if len(self.group_sizes) != len(self.weights) or min(self.group_sizes, default=0) < 1:
            raise ValueError(f"need one weight row per group and >= 1 user per group, got sizes {self.group_sizes}")
        if any(len(w) != len(FEATURE_NAMES) for w in self.weights):
            raise ValueError(f"each weight row needs {len(FEATURE_NAMES)} entries, one per {FEATURE_NAMES}")
        self.check_labelling()

    @property
    def group_names(self) -> tuple[str, ...]:
        return tuple(f"g{g}" for g in range(len(self.group_sizes)))

    def _word_values(self) -> np.ndarray:
        return _category_matrix() @ np.asarray(self.weights, dtype=np.float32).T


@functools.lru_cache(maxsize=1)
def _category_matrix() -> np.ndarray:
    """[V + 1, C] one-hot category of each VOCABULARY word; unknown words belong to no category."""
    onehot = np.zeros((len(VOCABULARY) + 1, len(FEATURE_NAMES)), dtype=np.float32)
    for c, words in enumerate(CATEGORIES.values()):
        for word in words:
            onehot[_TOKEN_OF[word], c] = 1.0
    return onehot


_scale_sizes = scale_sizes  # kept for callers of the old private name


def planted_world(
    num_groups: int = 3,
    group_sizes: Sequence[int] | None = (6, 3, 1),
    pairs_per_user: int = 24,
    noise: float = 0.5,
    seed: int = 0,
    *,
    num_users: int | None = None,
    candidates: int = 64,
) -> PlantedWorld:
    """A world with ``num_groups`` planted linear preferences over word categories.

    Args:
      group_sizes: users per group (None: equal, needs ``num_users``). With ``num_users`` they are a ratio,
        e.g. ``(6, 3, 1)`` and ``num_users=50`` gives ``(30, 15, 5)``.
      pairs_per_user: labelled pairs per user.
      noise: Bradley-Terry temperature in units of the typical reward gap: each group's weights are scaled so the
        median |r(a) - r(b)| over random pairs is 1, so noise=0.5 labels a median pair correctly 88% of the time.
      seed: fixes the weights, the user-group assignment and the default labels.
      candidates: random weight draws tried; the one whose groups disagree most (on which of two random responses
        is better, worst pair of groups) is kept, so groups are clearly distinguishable.
    """
    if group_sizes is None:
        if num_users is None:
            raise ValueError("give group_sizes, num_users, or both")
        group_sizes = (1,) * num_groups
    if len(group_sizes) != num_groups:
        raise ValueError(f"group_sizes has {len(group_sizes)} entries for num_groups={num_groups}")
    sizes = _scale_sizes(group_sizes, num_users) if num_users is not None else tuple(int(s) for s in group_sizes)

    rng = np.random.default_rng([seed, 0])
    # Calibrate on the responses the world will label.
    a, b = [_response(rng) for _ in range(512)], [_response(rng) for _ in range(512)]
    gap = (_word_counts(a) - _word_counts(b)) @ _category_matrix()  # [P, C] feature differences
    best, best_score = None, -math.inf
    for _ in range(candidates):
        w = rng.normal(size=(num_groups, len(FEATURE_NAMES)))
        signs = np.sign(gap @ w.T)  # [P, G]: which response each group prefers
        disagreement = [np.mean(signs[:, i] != signs[:, j]) for i in range(num_groups) for j in range(i)]
        score = min(disagreement, default=1.0)
        if score > best_score:
            best, best_score = w, score
    best = best / np.maximum(np.median(np.abs(gap @ best.T), axis=0), 1e-6)[:, None]  # median reward gap 1
    return PlantedWorld(
        group_sizes=sizes,
        weights=tuple(tuple(float(x) for x in row) for row in best),
        pairs_per_user=pairs_per_user,
        bt_temperature=noise,
        seed=seed,
    )
