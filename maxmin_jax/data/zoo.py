"""A zoo of preference worlds for EM: seeded generators whose groups differ by different things.

Every zoo world speaks one closed vocabulary (one word-level tokenizer for all of them, so one compiled reward
model serves the whole zoo). Prompts ask about a topic, sometimes "briefly" or "in detail"; responses are a few
sentences (or a dash list) mixing topic words, fillers, polite words, hedges and punctuation, with lengths, topic
mixes and punctuation styles that vary from response to response, so each feature varies on its own.

A group's true reward is a weighted sum of named features of (prompt, response) (`FEATURES`), scaled so that the
mean |r(a) - r(b)| over random pairs is 1; `bt_temperature` is then the label noise in those units. Families
(`FAMILIES`), each separating the groups by something else:

- lexical:  each group likes the words of one topic (sun, sea, forest, city, food).
- length:   each group wants its own length (-|length - target|; 2 groups: short vs long).
- polarity: a word class one group likes and another dislikes (polite words, hedges, exclamations).
- format:   punctuation and layout ("!", "?", dash lists, commas, full stops).
- mix:      each group a random signed mix of two features, chosen so that the groups disagree the most.
- prompt:   preferences that depend on the prompt: stay on the prompt's topic, talk about the *next* topic,
            follow the prompt's "briefly" / "in detail", or do the opposite; their averages over prompts agree, so
            only a model that reads the prompt can tell the groups apart.
- sunsea:   the world of an outside report: 'sun' words, 'sea' words, or short answers, at 6:3:1, 50 users,
            24 pairs each, raw counts with Bradley-Terry temperature 1.

`sample_world(seed)` draws a family and its settings (2 to 5 groups, shares up to 20:1, 8 to 32 pairs per user,
0 to 10% flipped labels, noise 0.2 to 1.0); `zoo(split)` lists the worlds used to tune EM's defaults ("tune"),
the worlds never tuned on ("heldout"), and the small worlds of the test suite ("test").
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import re
from collections.abc import Sequence

import numpy as np

from maxmin_jax.data.world import RngLike, SyntheticWorld, scale_sizes

TOPICS = {
    "sun": ("sun", "sunny", "bright", "warm", "light", "summer", "golden", "shine"),
    "sea": ("sea", "wave", "ocean", "tide", "shore", "salt", "boat", "sail"),
    "forest": ("forest", "tree", "leaf", "moss", "pine", "fern", "root", "bark"),
    "city": ("city", "street", "car", "tower", "bus", "road", "shop", "bridge"),
    "food": ("food", "bread", "soup", "apple", "rice", "cheese", "honey", "tea"),
}
TOPIC_NAMES = tuple(TOPICS)
POLITE = ("please", "thanks", "kindly", "gladly", "sorry")
HEDGES = ("maybe", "perhaps", "possibly", "probably", "might")
FILLERS = ("the", "a", "and", "is", "it", "was", "of", "to", "we", "you", "so", "with", "very", "there")
PUNCTUATION = (".", ",", "!", "?", "-")
INSTRUCTIONS = ("briefly", "in detail")
PROMPT_WORDS = ("tell", "me", "about", "briefly", "in", "detail", "describe", "explain", ":")
VOCABULARY = tuple(dict.fromkeys(itertools.chain(*TOPICS.values(), POLITE, HEDGES, FILLERS, PUNCTUATION,
                                                 PROMPT_WORDS)))
_TOPIC_OF = {w: t for t, words in TOPICS.items() for w in words}
_WORD = re.compile(r"\w+|[^\w\s]")

# Feature name -> what it measures on (prompt, response). "length" counts every token of the response.
FEATURES = (*(f"count:{t}" for t in TOPIC_NAMES), "count:polite", "count:hedge",
            *(f"count:{p}" for p in PUNCTUATION), "length", "on_topic", "next_topic", "instructed_length")
FAMILIES = ("lexical", "length", "polarity", "format", "mix", "prompt", "sunsea")

Term = tuple[str, float]  # (feature, weight); "target_length:T" means -|length - T|


def _pick(rng: np.random.Generator, words: Sequence[str]) -> str:
    return words[int(rng.integers(len(words)))]


def _prompt_parts(prompt: str) -> tuple[str | None, int]:
    """(topic, instruction sign): +1 "in detail", -1 "briefly", 0 neither."""
    words = prompt.split()
    topic = next((w for w in words if w in TOPICS), None)
    sign = -1 if "briefly" in words else (1 if "detail" in words else 0)
    return topic, sign


RESPONSE_STYLES = ("mixed", "independent")


def _response(rng: np.random.Generator, prompt: str, style: str = "mixed") -> str:
    """"mixed": each response draws its own topic mix (leaning to the prompt's topic), politeness, hedging and
    taste for ".", "!", "?", so words of a kind occur together. "independent": every word, sentence end and comma
    is drawn from one distribution for all responses, so no two words co-occur more than chance says."""
    topic, sign = _prompt_parts(prompt)
    if style == "mixed":
        mix = rng.dirichlet(np.full(len(TOPICS), 0.6))
        if topic is not None:
            mix = 0.5 * mix + 0.5 * np.eye(len(TOPICS))[TOPIC_NAMES.index(topic)]
        polite, hedge = rng.uniform(0, 0.25, size=2)
        ends = np.cumsum(rng.dirichlet(np.ones(3)))  # this response's taste for ".", "!" and "?"
    else:
        mix, polite, hedge, ends = np.full(len(TOPICS), 1 / len(TOPICS)), 0.125, 0.125, np.arange(1, 4) / 3
    cumulative = np.cumsum(mix)
    sentences = int(rng.integers(1, 5)) if sign == 0 else int(np.clip(rng.integers(1, 5) + sign, 1, 4))
    as_list = rng.random() < 0.25
    out = []
    for _ in range(sentences):
        words = []
        for _ in range(int(rng.integers(2, 7))):
            u, v = rng.random(2)
            if u < polite:
                words.append(_pick(rng, POLITE))
            elif u < polite + hedge:
                words.append(_pick(rng, HEDGES))
            elif v < 0.35:
                words.append(_pick(rng, FILLERS))
            else:
                topic_words = TOPICS[TOPIC_NAMES[min(int(np.searchsorted(cumulative, rng.random())), 4)]]
                words.append(_pick(rng, topic_words))
            if rng.random() < 0.08:
                words.append(",")
        if as_list:
            out.append("- " + " ".join(words))
        else:
            out.append(" ".join(words) + " " + ".!?"[min(int(np.searchsorted(ends, rng.random())), 2)])
    return " ".join(out)


def features(prompts: Sequence[str], responses: Sequence[str]) -> dict[str, np.ndarray]:
    """Every feature of `FEATURES` for each (prompt, response), as float arrays [N]."""
    n = len(responses)
    out = {name: np.zeros(n) for name in FEATURES}
    for i, (prompt, response) in enumerate(zip(prompts, responses)):
        tokens = _WORD.findall(response)
        topic, sign = _prompt_parts(prompt)
        out["length"][i] = len(tokens)
        for tok in tokens:
            if tok in _TOPIC_OF:
                out[f"count:{_TOPIC_OF[tok]}"][i] += 1
            elif tok in POLITE:
                out["count:polite"][i] += 1
            elif tok in HEDGES:
                out["count:hedge"][i] += 1
            elif tok in PUNCTUATION:
                out[f"count:{tok}"][i] += 1
        if topic is not None:
            out["on_topic"][i] = out[f"count:{topic}"][i]
            nxt = TOPIC_NAMES[(TOPIC_NAMES.index(topic) + 1) % len(TOPIC_NAMES)]
            out["next_topic"][i] = out[f"count:{nxt}"][i]
        out["instructed_length"][i] = sign * len(tokens)
    return out


def _term_value(feats: dict[str, np.ndarray], name: str) -> np.ndarray:
    if name.startswith("target_length:"):
        return -np.abs(feats["length"] - float(name.split(":", 1)[1]))
    if name not in feats:
        raise ValueError(f"unknown zoo feature {name!r}; expected one of {FEATURES} or 'target_length:T'")
    return feats[name]


def _raw_rewards(terms: Sequence[Sequence[Term]], prompts, responses) -> np.ndarray:
    feats = features(prompts, responses)
    return np.stack([sum((w * _term_value(feats, f) for f, w in group), np.zeros(len(responses)))
                     for group in terms], axis=1)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ZooWorld(SyntheticWorld):
    """One zoo world: group g's reward is `sum_(f, w) in terms[g] w * feature_f / scale[g]`.

    Build with `zoo_world` or `sample_world`, which set `scale` so that the mean reward gap over random pairs is 1.
    """

    family: str
    names: tuple[str, ...]
    terms: tuple[tuple[Term, ...], ...]
    scale: tuple[float, ...]
    group_sizes: tuple[int, ...]
    pairs_per_user: int = 24
    bt_temperature: float = 0.5
    flip_rate: float = 0.0
    prompt_style: str = "topic"  # "topic": "tell me about the sea :"; "instructed": with "briefly" / "in detail"
    response_style: str = "mixed"  # `RESPONSE_STYLES`: whether words of a kind occur together (`_response`)
    seed: int = 0

    def __post_init__(self) -> None:
        if not (len(self.names) == len(self.terms) == len(self.scale) == len(self.group_sizes)):
            raise ValueError("names, terms, scale and group_sizes need one entry per group")
        if self.prompt_style not in ("topic", "instructed"):
            raise ValueError(f"prompt_style must be 'topic' or 'instructed', got {self.prompt_style!r}")
        if self.response_style not in RESPONSE_STYLES:
            raise ValueError(f"response_style must be one of {RESPONSE_STYLES}, got {self.response_style!r}")
        self.check_labelling()

    @property
    def group_names(self) -> tuple[str, ...]:
        return self.names

    def tokenizer(self):
        from maxmin_jax.data.tokenizer import build_word_tokenizer

        return build_word_tokenizer(VOCABULARY)

    def prompts(self, n: int, rng: RngLike = None) -> list[str]:
        rng = np.random.default_rng(rng)
        out = []
        for _ in range(n):
            topic = _pick(rng, TOPIC_NAMES)
            verb = _pick(rng, ("tell me about the", "describe the", "explain the"))
            if self.prompt_style == "instructed":
                out.append(f"{_pick(rng, INSTRUCTIONS)} {verb} {topic} :")
            else:
                out.append(f"{verb} {topic} :")
        return out

    def candidates(self, prompts: Sequence[str], rng: RngLike = None) -> list[str]:
        rng = np.random.default_rng(rng)
        return [_response(rng, p, self.response_style) for p in prompts]

    def sample_reviews(self, n: int, rng: RngLike = None) -> list[str]:
        """`n` prompt + " " + response texts (an SFT corpus for the world)."""
        rng = np.random.default_rng(rng)
        prompts = self.prompts(n, rng)
        return [f"{p} {r}" for p, r in zip(prompts, self.candidates(prompts, rng))]

    def true_rewards(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts for {len(responses)} responses")
        return _raw_rewards(self.terms, prompts, responses) / np.asarray(self.scale)

    def describe(self) -> str:
        groups = ", ".join(f"{n}({len(self.terms[i])} terms)x{s}" for i, (n, s) in
                           enumerate(zip(self.names, self.group_sizes)))
        style = "" if self.response_style == "mixed" else f", {self.response_style} responses"
        return (f"{self.family}: {groups}; {self.pairs_per_user} pairs/user, T={self.bt_temperature:g}, "
                f"flip={self.flip_rate:g}{style}, seed={self.seed}")


# Families: group reward terms -----------------------------------------------------------------------------------
def _family_terms(family: str, num_groups: int, rng: np.random.Generator, response_style: str = "mixed"
                  ) -> tuple[tuple[str, ...], tuple[tuple[Term, ...], ...], str]:
    """(group names, reward terms per group, prompt style) of a family with `num_groups` groups."""
    if family == "lexical":
        topics = rng.permutation(TOPIC_NAMES)[:num_groups]
        return tuple(f"likes_{t}" for t in topics), tuple(((f"count:{t}", 1.0),) for t in topics), "topic"
    if family == "length":
        targets = np.linspace(3, 27, num_groups).round().astype(int)
        return (tuple(f"length_{t}" for t in targets), tuple(((f"target_length:{t}", 1.0),) for t in targets),
                "topic")
    if family == "polarity":
        pool = [("count:polite", "polite"), ("count:hedge", "hedge"), ("count:!", "exclaim")]
        names, terms = [], []
        for g in range(num_groups):
            feature, label = pool[(g // 2) % len(pool)]
            sign = 1.0 if g % 2 == 0 else -1.0
            names.append(("likes_" if sign > 0 else "dislikes_") + label)
            terms.append(((feature, sign),))
        return tuple(names), tuple(terms), "topic"
    if family == "format":
        pool = [("count:!", "exclaim"), ("count:?", "question"), ("count:-", "list"), ("count:.", "plain"),
                ("count:,", "comma")]
        order = rng.permutation(len(pool))[:num_groups]
        return (tuple(f"likes_{pool[i][1]}" for i in order), tuple(((pool[i][0], 1.0),) for i in order), "topic")
    if family == "prompt":
        pool = [("on_topic", (("on_topic", 1.0),)), ("next_topic", (("next_topic", 1.0),)),
                ("follows_length", (("instructed_length", 1.0),)),
                ("against_length", (("instructed_length", -1.0),))]
        # Twins (0, 1) and (2, 3) value the same features on average over prompts; a world's groups include a twin
        # pair, so the prompt is needed to tell them apart.
        first = int(rng.integers(2))
        order = [2 * first, 2 * first + 1, 2 * (1 - first), 2 * (1 - first) + 1][:num_groups]
        return tuple(pool[i][0] for i in order), tuple(pool[i][1] for i in order), "instructed"
    if family == "sunsea":
        return ("sun", "sea", "short"), ((("count:sun", 1.0),), (("count:sea", 1.0),), (("length", -1.0),)), "topic"
    if family == "mix":
        return _mixed_terms(num_groups, rng, response_style)
    raise ValueError(f"unknown zoo family {family!r}; expected one of {FAMILIES}")


_MIX_FEATURES = (*(f"count:{t}" for t in TOPIC_NAMES), "count:polite", "count:hedge", "count:!", "count:?", "length")


def _mixed_terms(num_groups: int, rng: np.random.Generator, response_style: str = "mixed", candidates: int = 32):
    """Each group: two features with random signs and weights; keep the draw whose groups disagree most."""
    probe = np.random.default_rng(rng.integers(1 << 31))
    world = dataclasses.replace(_PROBE_WORLD, response_style=response_style)
    prompts = world.prompts(256, probe)
    a, b = world.candidates(prompts, probe), world.candidates(prompts, probe)
    fa, fb = features(prompts, a), features(prompts, b)
    gap = np.stack([fa[f] - fb[f] for f in _MIX_FEATURES], axis=1) / np.std(
        np.stack([fa[f] for f in _MIX_FEATURES], axis=1), axis=0)
    best, best_score = None, -np.inf
    for _ in range(candidates):
        w = np.zeros((num_groups, len(_MIX_FEATURES)))
        for g in range(num_groups):
            idx = rng.choice(len(_MIX_FEATURES), size=2, replace=False)
            w[g, idx] = rng.choice([-1.0, 1.0], size=2) * rng.uniform(0.5, 1.0, size=2)
        signs = np.sign(gap @ w.T)
        score = min((np.mean(signs[:, i] != signs[:, j]) for i in range(num_groups) for j in range(i)), default=1.0)
        if score > best_score:
            best, best_score = w, score
    std = np.std(np.stack([fa[f] for f in _MIX_FEATURES], axis=1), axis=0)
    terms = tuple(tuple((_MIX_FEATURES[i], round(float(best[g, i] / std[i]), 4)) for i in np.flatnonzero(best[g]))
                  for g in range(num_groups))
    return tuple(f"mix{g}" for g in range(num_groups)), terms, "topic"


_PROBE_WORLD = ZooWorld(family="probe", names=("p",), terms=((("length", 1.0),),), scale=(1.0,), group_sizes=(1,))


@functools.lru_cache(maxsize=256)
def _gap_scale(terms, prompt_style: str, seed: int, response_style: str = "mixed") -> tuple[float, ...]:
    """Mean |r_g(a) - r_g(b)| over 512 random pairs, per group."""
    probe = dataclasses.replace(_PROBE_WORLD, prompt_style=prompt_style, response_style=response_style)
    rng = np.random.default_rng([seed, 3])
    prompts = probe.prompts(512, rng)
    a, b = probe.candidates(prompts, rng), probe.candidates(prompts, rng)
    gap = np.abs(_raw_rewards(terms, prompts, a) - _raw_rewards(terms, prompts, b)).mean(axis=0)
    return tuple(float(max(g, 1e-6)) for g in gap)


def zoo_world(family: str, *, num_groups: int | None = None, shares: Sequence[float] | None = None,
              num_users: int = 50, pairs_per_user: int = 24, noise: float = 0.5, flip_rate: float = 0.0,
              response_style: str = "mixed", seed: int = 0) -> ZooWorld:
    """A world of `family` (one of `FAMILIES`).

    Args:
      num_groups: 2 to 5 (prompt: 2 to 4; sunsea: 3). Default: 3 (sunsea's own).
      shares: relative group sizes, e.g. (6, 3, 1); default equal. Each group keeps at least one user.
      num_users: users in all groups together.
      pairs_per_user: labelled pairs per user.
      noise: Bradley-Terry temperature in units of the mean reward gap between random responses (sunsea: in
        word counts, as the outside report had it).
      flip_rate: fraction of labels flipped at random.
      response_style: "mixed" (words of a kind occur together) or "independent" (every word drawn on its own).
      seed: fixes the family's random choices (which topics, features), the users' groups and the default rows.
    """
    rng = np.random.default_rng([seed, 4, FAMILIES.index(family) if family in FAMILIES else 99])
    if family == "sunsea":
        num_groups = 3 if num_groups is None else num_groups
        if num_groups != 3:
            raise ValueError(f"the sunsea world has 3 groups, got num_groups={num_groups}")
    num_groups = 3 if num_groups is None else num_groups
    limit = 4 if family == "prompt" else 5
    if not 1 <= num_groups <= limit:
        raise ValueError(f"zoo family {family!r} has 1 to {limit} groups, got num_groups={num_groups}")
    if response_style not in RESPONSE_STYLES:
        raise ValueError(f"response_style must be one of {RESPONSE_STYLES}, got {response_style!r}")
    names, terms, style = _family_terms(family, num_groups, rng, response_style)
    shares = (1.0,) * num_groups if shares is None else tuple(shares)
    if len(shares) != num_groups:
        raise ValueError(f"shares has {len(shares)} entries for num_groups={num_groups}")
    scale = (1.0,) * num_groups if family == "sunsea" else _gap_scale(terms, style, seed, response_style)
    return ZooWorld(family=family, names=names, terms=terms, scale=scale,
                    group_sizes=scale_sizes(shares, num_users), pairs_per_user=pairs_per_user,
                    bt_temperature=noise, flip_rate=flip_rate, prompt_style=style, response_style=response_style,
                    seed=seed)


def sunsea_world(seed: int = 0, *, num_users: int = 50, pairs_per_user: int = 24,
                 response_style: str = "mixed") -> ZooWorld:
    """The outside report's world: 'sun' words, 'sea' words, or short answers, at 6:3:1."""
    return zoo_world("sunsea", shares=(6, 3, 1), num_users=num_users, pairs_per_user=pairs_per_user, noise=1.0,
                     response_style=response_style, seed=seed)


def sample_world(seed: int, family: str | None = None, response_style: str = "mixed") -> ZooWorld:
    """A zoo world with settings drawn from `seed`: family (unless given), 2 to 5 groups (prompt: up to 4), shares
    with up to 20:1 between the largest and smallest group, 30 to 80 users, 8 to 32 pairs per user, noise 0.2 to
    1.0, 0 to 10% flipped labels."""
    rng = np.random.default_rng([seed, 5])
    family = family or str(rng.choice([f for f in FAMILIES if f != "sunsea"]))
    if family == "sunsea":
        return sunsea_world(seed, response_style=response_style)
    num_groups = int(rng.integers(2, (4 if family == "prompt" else 5) + 1))
    ratio = float(np.exp(rng.uniform(0, np.log(20))))  # largest / smallest share
    shares = np.sort(np.exp(rng.uniform(0, np.log(ratio), size=num_groups)))[::-1]
    shares[0], shares[-1] = ratio, 1.0
    return zoo_world(family, num_groups=num_groups, shares=tuple(float(s) for s in shares),
                     num_users=int(rng.integers(30, 81)), pairs_per_user=int(rng.integers(8, 33)),
                     noise=float(rng.uniform(0.2, 1.0)), flip_rate=float(rng.uniform(0, 0.1)),
                     response_style=response_style, seed=seed)


def zoo(split: str) -> list[ZooWorld]:
    """The named worlds of a split.

    - "tune": one world per family with fixed settings, plus sampled worlds (seeds 0-7): what EM's defaults were
      chosen on.
    - "heldout": sampled worlds with seeds 1000-1013 and each family at other settings: never tuned on.
    - "test": small worlds for the test suite (one per family, 2 to 4 groups, 24 to 40 users).
    - "independent": one world per family and sampled worlds (seeds 2000-2011) whose responses draw every word on
      its own (`RESPONSE_STYLES`), so no word class can be found from which words occur together.
    """
    if split == "tune":
        fixed = [sunsea_world(0),
                 zoo_world("lexical", num_groups=4, shares=(8, 4, 2, 1), num_users=60, seed=0),
                 zoo_world("length", num_groups=2, shares=(10, 1), num_users=55, seed=0),
                 zoo_world("polarity", num_groups=2, shares=(3, 1), num_users=40, seed=0),
                 zoo_world("format", num_groups=3, num_users=45, noise=0.3, seed=0),
                 zoo_world("mix", num_groups=3, shares=(5, 3, 1), num_users=54, seed=0),
                 zoo_world("prompt", num_groups=2, num_users=40, pairs_per_user=32, seed=0)]
        return fixed + [sample_world(s) for s in range(8)]
    if split == "heldout":
        fixed = [sunsea_world(1),
                 zoo_world("lexical", num_groups=5, shares=(5, 4, 3, 2, 1), num_users=75, pairs_per_user=16,
                           flip_rate=0.05, seed=1),
                 zoo_world("length", num_groups=3, num_users=45, pairs_per_user=20, seed=1),
                 zoo_world("polarity", num_groups=4, num_users=60, seed=1),
                 zoo_world("format", num_groups=2, shares=(20, 1), num_users=63, pairs_per_user=32, noise=0.3,
                           seed=1),
                 zoo_world("mix", num_groups=2, num_users=40, flip_rate=0.1, seed=1),
                 zoo_world("prompt", num_groups=3, shares=(2, 1, 1), num_users=48, pairs_per_user=32, seed=1)]
        return fixed + [sample_world(s) for s in range(1000, 1014)]
    if split == "test":
        return [zoo_world("lexical", num_groups=3, shares=(2, 1, 1), num_users=32, pairs_per_user=16, seed=2),
                zoo_world("length", num_groups=2, shares=(3, 1), num_users=24, pairs_per_user=16, seed=2),
                zoo_world("polarity", num_groups=2, num_users=24, pairs_per_user=16, seed=2),
                zoo_world("format", num_groups=3, num_users=30, pairs_per_user=16, noise=0.3, seed=2),
                zoo_world("mix", num_groups=2, shares=(2, 1), num_users=24, pairs_per_user=16, seed=2),
                zoo_world("prompt", num_groups=2, num_users=24, pairs_per_user=24, seed=2),
                zoo_world("lexical", num_groups=4, num_users=32, pairs_per_user=16, seed=3)]
    if split == "independent":
        style = {"response_style": "independent"}
        fixed = [sunsea_world(2, **style),
                 zoo_world("lexical", num_groups=3, shares=(4, 2, 1), num_users=42, seed=2, **style),
                 zoo_world("length", num_groups=2, shares=(5, 1), num_users=36, seed=2, **style),
                 zoo_world("polarity", num_groups=3, shares=(2, 1, 1), num_users=40, seed=2, **style),
                 zoo_world("format", num_groups=3, num_users=45, noise=0.3, seed=2, **style),
                 zoo_world("mix", num_groups=3, shares=(3, 2, 1), num_users=48, seed=2, **style),
                 zoo_world("prompt", num_groups=2, num_users=40, pairs_per_user=32, seed=2, **style)]
        return fixed + [sample_world(s, **style) for s in range(2000, 2012)]
    raise ValueError(f"unknown zoo split {split!r}; expected one of {SPLITS}")


SPLITS = ("tune", "heldout", "test", "independent")


__all__ = ["FAMILIES", "FEATURES", "RESPONSE_STYLES", "SPLITS", "VOCABULARY", "ZooWorld", "features", "sample_world",
           "sunsea_world", "zoo", "zoo_world"]
