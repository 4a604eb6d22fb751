"""EM on zoo worlds it was not tuned on: the defaults recover the groups where the true rewards can (oracle ARI
>= 0.95), for two seeds, from the library and from the command line; num_groups="auto" finds K; bad inputs and
diverged fits stop with a clear error instead of a silent result. The per-world table is in docs/em.md.

Every reward model is a one-layer GPT-2 (hidden 32) trained from scratch over the zoo's one word vocabulary, so
all fits share one model config and the E-/M-steps compile once per K for the whole file.
"""

import dataclasses
import json

import numpy as np
import pytest
from flax import nnx

from maxmin_jax.data import tokenize_pairs
from maxmin_jax.data.zoo import zoo, zoo_world
from maxmin_jax.errors import ConfigError, DataError, NumericalFault
from maxmin_jax.models import GPT2Config
from maxmin_jax.rewards import EMConfig, RewardModel, clustering_metrics, fit_em, fit_rewards, fit_single_reward
from maxmin_jax.rewards import em_rounds
from maxmin_jax.rewards.diagnostics import fit_warnings
from maxmin_jax.rewards.init import GAIN_STANDARD_ERRORS

TEST_WORLDS = zoo("test")  # small worlds of every family; none of them was used to choose the defaults
CLI_WORLD = 2  # polarity, 2 groups, 24 users
NEAR_TIE = 2.0  # nats: a user the true rewards prefer in their own group by less than this is a near-tie


@pytest.fixture(scope="module")
def worlds():
    out = {}
    for i, world in enumerate(TEST_WORLDS):
        rows = world.preference_rows()
        out[i] = (world, rows, tokenize_pairs(world.tokenizer(), rows, max_length=64), world.oracle_ari(rows))
    return out


@pytest.fixture(scope="module")
def model_config(worlds):
    world = worlds[0][0]
    return GPT2Config(vocab_size=len(world.tokenizer()), max_position_embeddings=64, hidden_size=32, num_layers=1,
                      num_heads=4)


def _fit(batch, model_config, config, heads=None):
    model = RewardModel.from_config(model_config, heads or config.num_groups, nnx.Rngs(config.seed))
    return fit_em(model, batch, config)


def _misassigned_and_near_ties(world, rows, batch, assignments) -> tuple[int, int]:
    """(users outside their cluster's majority group, users whose own group the true rewards prefer by less than
    NEAR_TIE nats of log-likelihood over the next group)."""
    names = list(world.group_names)
    truth = np.array([names.index(g) for g in batch.groups])
    diff = (world.true_rewards([r.prompt for r in rows], [r.chosen for r in rows])
            - world.true_rewards([r.prompt for r in rows], [r.rejected for r in rows])) / world.bt_temperature
    L = np.zeros((batch.num_users, len(names)))
    np.add.at(L, batch.user_index, -np.logaddexp(0.0, -diff))
    own = L[np.arange(len(truth)), truth]
    L[np.arange(len(truth)), truth] = -np.inf
    near_ties = int(np.sum(own - L.max(axis=1) < NEAR_TIE))
    majority = {c: np.bincount(truth[assignments == c]).argmax() for c in np.unique(assignments)}
    return int(sum(majority[c] != t for c, t in zip(assignments, truth))), near_ties


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("index", [i for i, w in enumerate(TEST_WORLDS) if w.oracle_ari() >= 0.95])
def test_defaults_recover_the_groups_where_the_oracle_can(worlds, model_config, index, seed):
    """ARI >= 0.9 on every test world whose oracle reaches 0.95. On a world where some user is a near-tie for
    the true rewards themselves (lexical #0: one of 32 users, preferred by 1.0 nat), a fit learned from 16 pairs
    per user may miss that user and no other (ARI 0.8999 there; docs/em.md)."""
    world, rows, batch, oracle = worlds[index]
    result = _fit(batch, model_config, EMConfig(num_groups=world.num_groups, seed=seed, progress=False))
    ari = clustering_metrics(result.assignments, batch.groups)["ari"]
    wrong, near_ties = _misassigned_and_near_ties(world, rows, batch, result.assignments)
    assert ari >= 0.9 or wrong <= near_ties, (
        f"test world {index} ({world.family}) seed {seed}: ARI {ari:.4f} (oracle {oracle:.2f}), {wrong} users "
        f"misassigned, {near_ties} near-ties; history {result.history}")
    # The reward-model rounds never end below where the token-feature start put the users.
    init = clustering_metrics(np.array(result.diagnostics["init"]["assignments"]), batch.groups)["ari"]
    assert ari >= init - 1e-9


def test_cli_given_only_num_groups(worlds, tmp_path, capsys):
    from conftest import save_word_gpt2

    from maxmin_jax.cli import main

    world, rows, _, _ = worlds[CLI_WORLD]
    data = tmp_path / "prefs.jsonl"
    data.write_text("".join(json.dumps({"user_id": r.user_id, "prompt": r.prompt, "chosen": r.chosen,
                                        "rejected": r.rejected}) + "\n" for r in rows))
    ckpt = save_word_gpt2(tmp_path / "ckpt", world.tokenizer())
    out = tmp_path / "rewards"
    assert main(["fit-rewards", "--data", str(data), "--model", str(ckpt), "--out", str(out),
                 "--num-groups", str(world.num_groups)]) == 0
    assignments = json.loads((out / "assignments.json").read_text())
    truth = dict(world.user_groups())
    users = sorted(assignments)
    ari = clustering_metrics(np.array([assignments[u] for u in users]), [truth[u] for u in users])["ari"]
    assert ari >= 0.9
    history = json.loads((out / "em_history.json").read_text())
    assert history["init"]["method"] == "features" and history["history"][0]["group_sizes"]
    assert (out / "em_history.png").stat().st_size > 0
    # auto through the same flags: the pipeline builds the chosen K's heads, the reward model saved has them
    capsys.readouterr()
    assert main(["fit-rewards", "--data", str(data), "--model", str(ckpt), "--out", str(tmp_path / "auto"),
                 "--num-groups", "auto", "--k-range", "[1, 3]", "--rounds", "1", "--steps", "2"]) == 0
    printed = capsys.readouterr().out
    meta = json.loads((tmp_path / "auto" / "reward_model" / "reward_model.json").read_text())
    auto = json.loads((tmp_path / "auto" / "em_history.json").read_text())
    assert meta["num_groups"] == auto["k_selection"]["chosen"] == auto["num_groups"] == 2
    assert '"num_groups": 2' in printed
    assert auto["k_selection"]["k"] == [1, 2, 3]



FOUR_GROUPS = zoo_world("format", num_groups=4, num_users=32, pairs_per_user=16, noise=0.3, seed=2)


@pytest.mark.parametrize("name", ["format #3 (3 groups)", "format, 4 groups"])
def test_auto_finds_the_number_of_groups(worlds, model_config, name):
    """num_groups="auto" finds K and the groups on a 3-group test world and on a 4-group world of 32 users (one
    that the previous criterion, the smallest K within one standard error of the best, split into 5), and the
    curve is in the diagnostics. (2 groups: the CLI test.)"""
    if name.startswith("format #3"):
        world, _, batch, _ = worlds[3]
    else:
        world = FOUR_GROUPS
        batch = tokenize_pairs(world.tokenizer(), world.preference_rows(), max_length=64)
    config = EMConfig(num_groups="auto", k_range=(1, 5), rounds=1, steps_per_round=2, progress=False)
    result = _fit(batch, model_config, config, heads=1)
    curve = result.diagnostics["k_selection"]
    assert result.num_groups == curve["chosen"] == world.num_groups, curve
    assert curve["k"] == [1, 2, 3, 4, 5] and len(curve["score"]) == len(curve["gain"]) == 5
    # Every group up to K paid for itself, the next one did not.
    K = world.num_groups
    assert all(g > GAIN_STANDARD_ERRORS * e for g, e in zip(curve["gain"][1:K], curve["standard_error"][1:K])), curve
    assert curve["gain"][K] <= GAIN_STANDARD_ERRORS * curve["standard_error"][K], curve
    assert clustering_metrics(result.assignments, batch.groups)["ari"] >= 0.9


# Bad inputs -----------------------------------------------------------------------------------------------------
def test_bad_numbers_of_groups_are_refused(worlds, model_config, capsys):
    from maxmin_jax.cli import main

    _, _, batch, _ = worlds[CLI_WORLD]
    with pytest.raises(ConfigError, match=r"EMConfig.num_groups: 25 is more than the 24 users"):
        _fit(batch, model_config, EMConfig(num_groups=batch.num_users + 1, progress=False))
    for k in (0, -1):
        with pytest.raises(ConfigError, match=r"EMConfig.num_groups: expected an integer >= 1"):
            EMConfig(num_groups=k)
    with pytest.raises(ConfigError, match="k_range"):
        EMConfig(num_groups="auto", k_range=(3, 2))
    with pytest.raises(ConfigError, match="init='features'"):
        EMConfig(num_groups="auto", init="round_robin")
    assert main(["fit-rewards", "--data", "x", "--model", "y", "--out", "z", "--num-groups", "0"]) == 2
    assert "error: --num-groups: expected an integer >= 1, got 0" in capsys.readouterr().err
    assert main(["fit-rewards", "--data", "x", "--model", "y", "--out", "z", "--num-groups", "auto", "--paper"]) == 2
    assert "--paper" in capsys.readouterr().err


def test_users_with_one_pair(worlds, model_config):
    _, _, batch, _ = worlds[CLI_WORLD]
    first = np.unique(batch.user_index, return_index=True)[1]
    with pytest.raises(DataError, match="every one of the 24 users has a single pair"):
        _fit(batch.take(first), model_config, EMConfig(num_groups=2, progress=False))
    # Some users with one pair: fitted, and said so.
    keep = np.sort(np.concatenate([first, np.flatnonzero(batch.user_index >= 3)]))
    few = batch.take(keep)
    result = _fit(few, model_config, EMConfig.paper(2, rounds=1, steps_per_round=2, progress=False))
    assert any("3 of 24 users have a single pair" in w for w in fit_warnings(result))


def test_an_empty_group_is_kept_with_zero_weight_and_a_warning(worlds, model_config):
    """EM may leave a group without users (K above what the data support): the fit keeps the head with weight 0
    and says so, rather than dropping it silently."""
    _, _, batch, _ = worlds[CLI_WORLD]
    result = _fit(batch, model_config, EMConfig.paper(2, rounds=1, steps_per_round=2, progress=False))
    result = dataclasses.replace(result, assignments=np.zeros(batch.num_users, int),
                                 responsibilities=np.tile([1.0, 0.0], (batch.num_users, 1)))
    assert any("group 1 collapsed: 0 users" in w for w in fit_warnings(result))


# Numerical faults ------------------------------------------------------------------------------------------------
def test_diverged_fits_stop_and_write_nothing(worlds, model_config, tmp_path, monkeypatch):
    world, rows, batch, _ = worlds[CLI_WORLD]
    model = RewardModel.from_config(model_config, 1, nnx.Rngs(0))
    model.head.set_value(model.head.get_value() * np.nan)
    with pytest.raises(NumericalFault, match=r"fit_em .*round 1.*(loss|grad_norm) = nan at step 1 \(not finite\)"):
        fit_single_reward(model, batch, steps=3, progress=False)
    # A guard that rejects every round's M-step (as after a diverging learning rate) leaves an untrained model:
    # an error, and fit_rewards writes no reward model.
    real = em_rounds.em_update

    def rejecting(gamma, L_old, L_new, **kw):
        _, L, new_gamma, stats = real(gamma, L_old, L_old, **kw)
        return np.bool_(False), L, new_gamma, stats

    monkeypatch.setattr(em_rounds, "em_update", rejecting)
    with pytest.raises(NumericalFault, match="rejected the M-step of every one of 2 rounds"):
        fit_rewards(rows, model_path_or_config=model_config, tokenizer=world.tokenizer(), num_groups=2, rounds=2,
                    steps_per_round=2, out_dir=tmp_path / "out", progress=False)
    assert not (tmp_path / "out" / "reward_model").exists()
