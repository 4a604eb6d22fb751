"""The world protocol: what a preference world with known ground truth provides, and the shared machinery.

A *world* has prompts, a true reward per group for (prompt, response) text, users with group labels, and a
labelling model that turns two responses into a preference. The review world, the planted worlds and the EM zoo
all implement `PreferenceWorld`; most do so by subclassing `SyntheticWorld`, which needs only four methods
(`group_names`, `tokenizer`, `prompts`, `candidates`, `true_rewards`) and derives users, labelled rows and the
oracle from them. `load_world("package.module:function", **kwargs)` builds a world from its factory's dotted path.

The labelling model (`SyntheticWorld.choice_probability`): user u of group g shown responses a and b to prompt x
picks a with probability `(1 - flip) * sigmoid(d / T) + flip * sigmoid(-d / T)`, d = r_g(x, a) - r_g(x, b),
T = `bt_temperature` (0: always the better one, ties by coin), flip = `flip_rate` (labels flipped at random).

The oracle assigns each user to the group under whose true reward their labels are most likely; its adjusted Rand
index against the true groups (`oracle_ari`) says how well any method could recover the groups from these rows.
With `group_sizes=True` each group is also weighted by its share of the users, as a mixture weights its groups:
where a small group's members are told apart by little evidence, that oracle misses them too.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

from maxmin_jax.data.schema import PreferenceRow

RngLike = np.random.Generator | int | Sequence[int] | None


@runtime_checkable
class PreferenceWorld(Protocol):
    """What the pipeline needs from a world (a synthetic one, or one a user writes).

    `group_names[g]` names group g; `true_rewards(prompts, responses)` is `[N, G]`, the reward of each response to
    its prompt for each group; `preference_rows(rng)` are the labelled pairs, each row carrying its user's true
    group; `user_groups()` lists `(user_id, group_name)` for every user.
    """

    @property
    def group_names(self) -> tuple[str, ...]: ...

    def tokenizer(self) -> Any: ...

    def prompts(self, n: int, rng: RngLike = None) -> list[str]: ...

    def true_rewards(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray: ...

    def user_groups(self) -> list[tuple[str, str]]: ...

    def preference_rows(self, rng: RngLike = None) -> list[PreferenceRow]: ...


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def scale_sizes(ratio: Sequence[float], total: int) -> tuple[int, ...]:
    """Largest-remainder rounding of `ratio` to integers summing to `total`, each at least 1."""
    if total < len(ratio):
        raise ValueError(f"num_users={total} is fewer than the {len(ratio)} groups")
    if min(ratio) <= 0:
        raise ValueError(f"group shares must be positive, got {tuple(ratio)}")
    exact = np.asarray(ratio, dtype=float) / sum(ratio) * total
    sizes = np.maximum(np.floor(exact).astype(int), 1)
    order = np.argsort(-(exact - np.floor(exact)), kind="stable")
    i = 0
    while sizes.sum() != total:
        step = 1 if sizes.sum() < total else -1
        j = order[i % len(order)] if step > 0 else int(np.argmax(sizes))
        sizes[j] += step
        i += 1
    return tuple(int(s) for s in sizes)


class SyntheticWorld:
    """A world whose users label pairs of candidate responses by their group's true reward.

    Subclasses (frozen dataclasses) provide the fields `group_sizes`, `pairs_per_user`, `bt_temperature`,
    `flip_rate` and `seed`, and the methods `group_names`, `tokenizer()`, `prompts(n, rng)`,
    `candidates(prompts, rng)` (one response per prompt) and `true_rewards(prompts, responses)`.
    """

    group_sizes: tuple[int, ...]
    pairs_per_user: int
    bt_temperature: float
    flip_rate: float = 0.0
    seed: int

    group_names: tuple[str, ...]

    def tokenizer(self):
        raise NotImplementedError

    def prompts(self, n: int, rng: RngLike = None) -> list[str]:
        raise NotImplementedError

    def candidates(self, prompts: Sequence[str], rng: RngLike = None) -> list[str]:
        raise NotImplementedError

    def true_rewards(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
        raise NotImplementedError

    # Derived -------------------------------------------------------------------------------------------------
    @property
    def num_groups(self) -> int:
        return len(self.group_names)

    @property
    def num_users(self) -> int:
        return int(sum(self.group_sizes))

    def check_labelling(self) -> None:
        """Validate the fields every synthetic world shares (call from `__post_init__`)."""
        if len(self.group_sizes) != len(self.group_names) or min(self.group_sizes, default=0) < 1:
            raise ValueError(f"need >= 1 user in each of the groups {self.group_names}, got sizes "
                             f"{self.group_sizes}")
        if self.pairs_per_user < 1:
            raise ValueError(f"pairs_per_user must be >= 1, got {self.pairs_per_user}")
        if self.bt_temperature < 0:
            raise ValueError(f"bt_temperature must be >= 0, got {self.bt_temperature}")
        if not 0.0 <= self.flip_rate < 0.5:
            raise ValueError(f"flip_rate must be in [0, 0.5), got {self.flip_rate}")

    def user_groups(self) -> list[tuple[str, str]]:
        """[(user_id, group_name)] for every user; which user is in which group is fixed by `seed`."""
        labels = np.repeat(np.arange(self.num_groups), self.group_sizes)
        labels = np.random.default_rng([self.seed, 1]).permutation(labels)
        width = len(str(len(labels) - 1))
        return [(f"user-{i:0{width}d}", self.group_names[g]) for i, g in enumerate(labels)]

    def choice_probability(self, reward_gap: np.ndarray) -> np.ndarray:
        """P(first response chosen) given its true reward gap over the second, under the labelling model."""
        d = np.asarray(reward_gap, dtype=np.float64)
        if self.bt_temperature > 0:
            p = _sigmoid(d / self.bt_temperature)
        else:
            p = np.where(d > 0, 1.0, np.where(d < 0, 0.0, 0.5))
        return (1.0 - self.flip_rate) * p + self.flip_rate * (1.0 - p)

    def preference_rows(self, rng: RngLike = None) -> list[PreferenceRow]:
        """`pairs_per_user` labelled pairs per user, shuffled; `row.group` is the user's true group.

        Each pair is two distinct candidates for one prompt, labelled by the labelling model (module docstring).
        `rng` defaults to one derived from `seed`, so the default rows are a fixed function of the world.
        """
        rng = np.random.default_rng([self.seed, 2] if rng is None else rng)
        users = self.user_groups()
        n = len(users) * self.pairs_per_user
        prompts = self.prompts(n, rng)
        first, second = self.candidates(prompts, rng), self.candidates(prompts, rng)
        for i in range(n):
            for _ in range(1000):  # chosen != rejected, always
                if second[i] != first[i]:
                    break
                second[i] = self.candidates([prompts[i]], rng)[0]
            else:
                raise ValueError(f"{type(self).__name__}: cannot draw two different responses to {prompts[i]!r}")
        group_of = np.repeat([self.group_names.index(g) for _, g in users], self.pairs_per_user)
        gap = (self.true_rewards(prompts, first) - self.true_rewards(prompts, second))[np.arange(n), group_of]
        first_wins = rng.random(n) < self.choice_probability(gap)
        rows = []
        for i in rng.permutation(n):
            user_id, group = users[i // self.pairs_per_user]
            a, b = (first[i], second[i]) if first_wins[i] else (second[i], first[i])
            rows.append(PreferenceRow(user_id=user_id, prompt=prompts[i], chosen=a, rejected=b, group=group))
        return rows

    # The oracle ----------------------------------------------------------------------------------------------
    def label_log_likelihoods(self, rows: Sequence[PreferenceRow]) -> tuple[list[str], np.ndarray]:
        """(user ids in first-seen order, [U, G] log-likelihood of each user's labels under each group's true
        reward and the labelling model)."""
        ll = np.log(np.clip(self.choice_probability(true_reward_gaps(self, rows)), 1e-12, 1.0))  # [N, G]
        users = list(dict.fromkeys(r.user_id for r in rows))
        index = {u: i for i, u in enumerate(users)}
        out = np.zeros((len(users), self.num_groups))
        np.add.at(out, [index[r.user_id] for r in rows], ll)
        return users, out

    def oracle_assignments(self, rows: Sequence[PreferenceRow], *, group_sizes: bool = False) -> dict[str, int]:
        """Each user's most likely group under the true rewards (ties to the lower index). With `group_sizes`, the
        most probable one: each group weighted by its share of the other users, as a mixture weights its groups
        (`rewards.linear_mixture`). A user of a small group whose labels favour it by less than log(the size
        ratio) then goes to the larger group, even with the true rewards."""
        users, ll = self.label_log_likelihoods(rows)
        if group_sizes:
            group_of = {r.user_id: self.group_names.index(r.group) for r in rows}
            own = np.eye(self.num_groups)[[group_of[u] for u in users]]
            others = (own.sum(axis=0) - own) / max(len(users) - 1, 1)
            ll = ll + np.log(np.maximum(others, 1e-12))
        return dict(zip(users, np.argmax(ll, axis=1).tolist()))

    def oracle_ari(self, rows: Sequence[PreferenceRow] | None = None, *, group_sizes: bool = False) -> float:
        """Adjusted Rand index of the oracle's assignment against the true groups (default: the default rows);
        `group_sizes` as `oracle_assignments`."""
        from sklearn.metrics import adjusted_rand_score

        rows = self.preference_rows() if rows is None else rows
        truth = {r.user_id: r.group for r in rows}
        oracle = self.oracle_assignments(rows, group_sizes=group_sizes)
        return float(adjusted_rand_score([truth[u] for u in oracle], list(oracle.values())))


PROTOCOL = ("group_names", "tokenizer", "prompts", "true_rewards", "user_groups", "preference_rows")
"""The members of `PreferenceWorld`, checked on what a factory returns."""


def resolve_factory(path: str, where: str) -> Callable[..., Any]:
    """The function or class at "package.module:function"; ValueError naming `where` and the path otherwise."""
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"{where}: expected 'package.module:function', got {path!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"{where}: cannot import module {module_name!r} of {path!r} ({e})") from e
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ValueError(f"{where}: module {module_name!r} has no function or class {attr!r}")
    return factory


def missing_members(world: Any) -> list[str]:
    return [name for name in PROTOCOL if not hasattr(world, name)]


def load_world(factory: str, **kwargs) -> PreferenceWorld:
    """Build a world from `"package.module:function"` (a function or class) called with `kwargs`.

    Raises ValueError naming the path when it does not resolve or the result lacks a protocol member.
    """
    world = resolve_factory(factory, f"world factory {factory!r}")(**kwargs)
    missing = missing_members(world)
    if missing:
        raise ValueError(f"world factory {factory!r} returned a {type(world).__name__} without {missing} "
                         f"(see maxmin_jax.data.world.PreferenceWorld)")
    return world


def true_reward_gaps(world: PreferenceWorld, rows: Sequence[PreferenceRow]) -> np.ndarray:
    """[N, G]: each row's true reward of the chosen response minus the rejected one's, under each group's reward."""
    prompts = [r.prompt for r in rows]
    return world.true_rewards(prompts, [r.chosen for r in rows]) - world.true_rewards(prompts,
                                                                                      [r.rejected for r in rows])


def expected_gap_scale(rewards_a: np.ndarray, rewards_b: np.ndarray) -> np.ndarray:
    """[G] median |r_g(a) - r_g(b)| over pairs (at least 1e-6): the unit a world's temperature is measured in."""
    return np.maximum(np.median(np.abs(rewards_a - rewards_b), axis=0), 1e-6)


__all__ = ["PreferenceWorld", "RngLike", "SyntheticWorld", "expected_gap_scale", "load_world", "scale_sizes",
           "true_reward_gaps"]
