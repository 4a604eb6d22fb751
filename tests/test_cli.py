"""The command line on local files: fit-rewards, then train-policy (through the pipeline's stages, resumable);
input errors are one line naming file, row, key or flag, internal bugs keep their traceback."""

import json

import numpy as np
import pytest

from conftest import save_word_gpt2
from maxmin_jax.cli import main
from maxmin_jax.data.synthetic import planted_world
from maxmin_jax.pipeline import stages


@pytest.fixture(scope="module")
def checkpoint_and_data(tmp_path_factory):
    """A tiny GPT-2 HF checkpoint with the world's word tokenizer, saved as a user would have it."""
    root = tmp_path_factory.mktemp("cli")
    world = planted_world(num_groups=2, group_sizes=(3, 3), pairs_per_user=8, seed=0)
    save_word_gpt2(root / "ckpt", world.tokenizer())
    rows = [{"user_id": r.user_id, "prompt": r.prompt, "chosen": r.chosen, "rejected": r.rejected}
            for r in world.preference_rows(0)]
    (root / "prefs.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (root / "prompts.txt").write_text("\n".join(world.prompts(16, 0)))
    return root


def train_policy_args(root, *, iterations, objective="softmin"):
    return ["train-policy", "--model", str(root / "ckpt"), "--rewards", str(root / "rewards"), "--prompts",
            str(root / "prompts.txt"), "--objective", objective, "--out", str(root / "policy"), "--iterations",
            str(iterations), "--batch-size", "4", "--max-new-tokens", "6", "--softmin-temperature", "0.25"]


def test_fit_rewards_then_train_policy(checkpoint_and_data, capsys, monkeypatch):
    """Both commands run the pipeline's stages: fit-rewards the reward stage, train-policy the training loop."""
    root = checkpoint_and_data
    through = []
    for name in ("reward_models", "iterate"):
        real_stage = getattr(stages, name)
        monkeypatch.setattr(stages, name, lambda *a, _f=real_stage, _n=name, **k: through.append(_n) or _f(*a, **k))
    assert main(["fit-rewards", "--data", str(root / "prefs.jsonl"), "--model", str(root / "ckpt"),
                 "--num-groups", "2", "--out", str(root / "rewards"), "--rounds", "2", "--steps", "5",
                 "--batch-size", "16", "--method", "soft"]) == 0
    assignments = json.loads((root / "rewards" / "assignments.json").read_text())
    assert len(assignments) == 6 and set(assignments.values()) <= {0, 1}
    history = json.loads((root / "rewards" / "em_history.json").read_text())
    assert history["config"]["method"] == "soft" and history["config"]["steps_per_round"] == 5
    assert len(history["history"]) <= 2

    from maxmin_jax.pipeline import algorithms

    built = []
    real = algorithms.make_objective
    monkeypatch.setattr(algorithms, "make_objective", lambda name, **kw: built.append((name, kw)) or real(name, **kw))
    assert main(train_policy_args(root, iterations=2)) == 0
    assert built == [("softmin", {"temperature": 0.25})]  # the objective's own arguments reach it
    assert through == ["reward_models", "reward_models", "iterate"]  # train-policy loads rewards through the stage
    curve = [r for r in map(json.loads, (root / "policy" / "metrics.jsonl").read_text().splitlines())
             if r["stage"] == "policy/softmin/ppo"]
    assert [r["step"] for r in curve] == [1, 2] and np.isfinite(curve[-1]["score"])
    # One more iteration continues from the checkpoint of iteration 2 instead of starting over.
    assert main(train_policy_args(root, iterations=3)) == 0
    resumed = [r for r in map(json.loads, (root / "policy" / "metrics.jsonl").read_text().splitlines())
               if r["stage"] == "policy/softmin/ppo"]
    assert [r["step"] for r in resumed] == [1, 2, 3] and resumed[:2] == curve
    assert "final: score" in capsys.readouterr().out
    from maxmin_jax import load_pretrained

    load_pretrained(root / "policy" / "policies" / "softmin")  # the trained policy is a loadable HF checkpoint
    # A changed flag on the same output directory is refused, naming the key.
    args = train_policy_args(root, iterations=3)
    args[args.index("--max-new-tokens") + 1] = "5"
    assert main(args) == 2
    assert "sampling.max_new_tokens: 6 -> 5" in capsys.readouterr().err
    # `single` needs a K = 1 reward model; these rewards have K = 2.
    args = train_policy_args(root, iterations=1, objective="single")
    args[args.index("--out") + 1] = str(root / "single")
    assert main(args) == 2
    assert "'single' needs the pooled single reward" in capsys.readouterr().err


def test_bad_rows_are_reported_with_file_and_row(checkpoint_and_data, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"user_id": "u1", "prompt": "p", "chosen": "same", "rejected": "same"}) + "\n")
    code = main(["fit-rewards", "--data", str(bad), "--model", str(checkpoint_and_data / "ckpt"),
                 "--num-groups", "2", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "bad.jsonl" in err and "row 1" in err and "Traceback" not in err
    assert "skip invalid rows: --skip-invalid)" in err  # the fix as this command takes it, not a config key


def test_settings_named_in_errors_are_spelled_as_each_command_takes_them():
    from maxmin_jax.cli import build_parser
    from maxmin_jax.errors import DataError, option, render

    commands = build_parser()._subparsers._group_actions[0].choices
    error = DataError(f"fix: {option('rewards.em.m_step.learning_rate')}, {option('preferences.skip_invalid', True)}, "
                      f"{option('rewards.em.num_groups', 3)}, {option('overwrite', True)}")
    spelled = {name: render(error, commands[name].get_default("spell")) for name in ("fit-rewards", "run")}
    assert spelled["fit-rewards"] == "fix: --learning-rate, --skip-invalid, --num-groups 3, --overwrite"
    assert spelled["run"] == ("fix: rewards.em.m_step.learning_rate, --set preferences.skip_invalid=true, "
                              "--set rewards.em.num_groups=3, --overwrite")
    assert render(error, commands["train-policy"].get_default("spell")).startswith(
        "fix: rewards.em.m_step.learning_rate, preferences.skip_invalid=True")  # no such flag: the config key


def test_flags_are_typed_by_the_config_they_set(capsys):
    with pytest.raises(SystemExit) as caught:
        main(["fit-rewards", "--data", "x", "--model", "y", "--out", "z", "--num-groups", "two"])
    assert caught.value.code == 2 and "argument --num-groups: expected int or one of 'auto', got 'two'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["fit-rewards", "--data", "x", "--model", "y", "--out", "z", "--num-groups", "2", "--guard", "3"])
    assert "argument --guard: expected bool, got 3" in capsys.readouterr().err


def test_internal_bugs_keep_their_traceback(monkeypatch, tmp_path):
    """A ValueError from inside the library is a bug, not an input error: it is not turned into a short message."""
    def broken(*args, **kwargs):
        raise ValueError("an internal invariant broke")

    monkeypatch.setattr("maxmin_jax.pipeline.run", broken)
    with pytest.raises(ValueError, match="an internal invariant broke"):
        main(["demo", "--out", str(tmp_path / "demo")])


def test_the_parser_and_the_top_level_names_import_only_what_they_use():
    """`maxmin-jax --help` and config parsing skip transformers, datasets and orbax (a second's import); every name
    the lazy packages export resolves."""
    import subprocess
    import sys

    code = ("import sys, maxmin_jax, maxmin_jax.data as data, maxmin_jax.pipeline as pipeline\n"
            "from maxmin_jax.cli import build_parser\n"
            "build_parser()\n"
            "heavy = [m for m in ('transformers', 'datasets', 'orbax.checkpoint') if m in sys.modules]\n"
            "assert not heavy, heavy\n"
            "for package in (maxmin_jax, data, pipeline):\n"
            "    assert set(dir(package)) >= set(package.__all__)\n"
            "    [getattr(package, name) for name in package.__all__]\n"
            "assert maxmin_jax.run is pipeline.run\n"
            "import importlib, types\n"  # a function named as its module stays the function
            "assert isinstance(importlib.import_module('maxmin_jax.generate'), types.ModuleType)\n"
            "assert callable(maxmin_jax.generate) and not isinstance(maxmin_jax.generate, types.ModuleType)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
