"""A world a user brings, through the documented protocol (docs/worlds.md): `CriticsWorld` below is written from
the protocol alone (no library base class), named in a config as `world: {factory: "test_worlds:critics_world"}`,
and runs the whole pipeline; its true rewards, scored on the decoded text, reach report.json. Bad factory paths and
worlds missing a protocol method are refused with errors naming the key and what is missing."""

import json

import numpy as np
import pytest
import yaml

from maxmin_jax.data.schema import PreferenceRow
from maxmin_jax.data.synthetic import NOUNS, POSITIVE, PROMPTS, VOCABULARY
from maxmin_jax.data.tokenizer import build_word_tokenizer
from maxmin_jax.errors import ConfigError
from maxmin_jax.pipeline import load_config, run


class CriticsWorld:
    """Two groups of movie reviewers: "fans" like positive words; "focused" like a review that names what the
    prompt asks about (its last word) and dislike length. The second reward depends on the prompt."""

    group_names = ("fans", "focused")

    def __init__(self, num_users: int, focused_share: float, pairs_per_user: int, seed: int):
        self.num_users, self.focused, self.pairs_per_user, self.seed = (
            num_users, max(1, round(num_users * focused_share)), pairs_per_user, seed)

    def tokenizer(self):
        return build_word_tokenizer(VOCABULARY)

    def prompts(self, n, rng=None):
        rng = np.random.default_rng(rng)
        return [PROMPTS[i] for i in rng.integers(0, len(PROMPTS), n)]

    def true_rewards(self, prompts, responses):
        rewards = np.zeros((len(responses), 2))
        for i, (prompt, response) in enumerate(zip(prompts, responses)):
            words = response.split()
            rewards[i, 0] = sum(w in POSITIVE for w in words)
            rewards[i, 1] = 2.0 * words.count(prompt.split()[-1]) - 0.25 * len(words)
        return rewards

    def user_groups(self):
        groups = ["focused"] * self.focused + ["fans"] * (self.num_users - self.focused)
        return [(f"critic-{i}", g) for i, g in enumerate(groups)]

    def preference_rows(self, rng=None):
        rng = np.random.default_rng([self.seed] if rng is None else rng)
        rows = []
        for user, group in self.user_groups():
            column = self.group_names.index(group)
            for prompt in self.prompts(self.pairs_per_user, rng):
                a, b = (" ".join(rng.choice([*POSITIVE, *NOUNS, "the", "was", "."], rng.integers(1, 7)))
                        for _ in range(2))
                gap = np.diff(self.true_rewards([prompt] * 2, [b, a])[:, column])[0]
                chosen, rejected = (a, b) if rng.random() < 1 / (1 + np.exp(-2 * gap)) else (b, a)
                rows.append(PreferenceRow(user, prompt, chosen, rejected, group=group))
        return rows


def critics_world(num_users: int = 12, focused_share: float = 0.25, pairs_per_user: int = 4, seed: int = 0):
    return CriticsWorld(num_users, focused_share, pairs_per_user, seed)


class Mute:
    """Everything a world has but `true_rewards`: nothing could judge a policy's responses."""

    group_names, tokenizer, prompts = CriticsWorld.group_names, CriticsWorld.tokenizer, CriticsWorld.prompts
    user_groups, preference_rows = CriticsWorld.user_groups, CriticsWorld.preference_rows


def mute_world():
    return Mute()


TINY = {"seed": 0,
        "model": {"hidden_size": 16, "num_layers": 1, "num_heads": 2, "sft_examples": 64,
                  "sft": {"steps": 4, "batch_size": 16}},
        "rewards": {"em": {"rounds": 1, "steps_per_round": 3, "batch_size": 16, "chunk_size": 16},
                    "single_reward_steps": 0},
        "sampling": {"max_new_tokens": 6},
        "policy": {"objectives": ["maxmin"], "iterations": 2, "prompt_batch": 8},
        "evaluation": {"standardizer_prompts": 16, "prompts": 16, "batch_size": 8, "bootstrap_resamples": 200}}


def write_config(tmp_path, world: dict):
    path = tmp_path / "world.yaml"
    path.write_text(yaml.safe_dump({**TINY, "preferences": {"source": "world", "world": world}}, sort_keys=False))
    return path


def test_a_world_of_ones_own_runs_end_to_end_and_its_true_rewards_reach_the_report(tmp_path):
    cfg = load_config(write_config(tmp_path, {"factory": "test_worlds:critics_world", "pairs_per_user": 4}))
    assert cfg.preferences.world.options == {"num_users": 12, "focused_share": 0.25, "pairs_per_user": 4, "seed": 0}
    report = run(cfg, tmp_path / "out", progress=False)
    assert report["groups"] == ["fans", "focused"] and report["group_sizes"] == {"fans": 9, "focused": 3}
    assert report["group_reward_kind"].startswith("true") and report["win_rate_kind"].startswith("true")
    # The report's numbers are the world's own true rewards of the decoded evaluation responses.
    tokenizer = build_word_tokenizer(VOCABULARY)
    samples = {}
    for name in ("reference", "maxmin"):
        stage = "evaluate/reference" if name == "reference" else "evaluate/maxmin/ppo"
        with np.load(tmp_path / "out" / stage / "samples.npz") as data:
            samples[name] = {k: data[k] for k in data.files}
        texts = [tokenizer.decode([t for t, m in zip(row, keep) if m], skip_special_tokens=True)
                 for row, keep in zip(samples[name]["tokens"].tolist(), samples[name]["mask"].tolist())]
        assert len(texts) == 16 and any(texts)
        # every response is scored against its own prompt: the reward of the second group depends on it
        focused = samples[name]["true_reward"][:, 1] + 0.25 * np.array([len(t.split()) for t in texts])
        np.testing.assert_allclose(samples[name]["true_reward"][:, 0],
                                   [sum(w in POSITIVE for w in t.split()) for t in texts])
        assert set(np.round(focused / 2, 6)) <= set(range(7))
    ref = samples["reference"]["true_reward"]
    expected = (samples["maxmin"]["true_reward"].mean(0) - ref.mean(0)) / np.maximum(ref.std(0), 1e-6)
    np.testing.assert_allclose(list(report["policies"]["maxmin"]["group_reward"].values()), expected, rtol=1e-5)
    wins = (samples["maxmin"]["true_reward"] > ref) + 0.5 * (samples["maxmin"]["true_reward"] == ref)
    rates = report["policies"]["maxmin"]["win_rate_vs_reference"]
    assert [rates[g]["rate"] for g in ("fans", "focused")] == pytest.approx(wins.mean(0).tolist())
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert saved["config"]["preferences"]["world"]["factory"] == "test_worlds:critics_world"


@pytest.mark.parametrize("world, message", [
    ({"factory": "no_such_module:world"}, r"preferences\.world\.factory: cannot import module 'no_such_module'"),
    ({"factory": "test_worlds:no_such_world"}, r"preferences\.world\.factory: module 'test_worlds' has no function "
                                                r"or class 'no_such_world'"),
    ({"factory": "test_worlds"}, r"preferences\.world\.factory: expected 'package\.module:function'"),
    ({"factory": "test_worlds:mute_world"}, r"preferences\.world: test_worlds:mute_world returned a Mute without "
                                             r"true_rewards"),
    ({"factory": "test_worlds:critics_world", "num_user": 3}, r"preferences\.world\.num_user: unknown key; "
                                                              r"critics_world takes num_users"),
    ({"factory": "test_worlds:critics_world", "name": "review"}, "either name .* or factory"),
])
def test_bad_world_factories_are_refused_by_name(tmp_path, world, message):
    with pytest.raises(ConfigError, match=message):
        load_config(write_config(tmp_path, world))
