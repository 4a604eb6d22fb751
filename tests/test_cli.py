"""The command line end to end on local files: fit-rewards, then train-policy; bad input gives clear errors."""

import json

import numpy as np
import pytest

from maxmin_jax.cli import main
from conftest import save_word_gpt2
from maxmin_jax.data.synthetic import planted_world


@pytest.fixture(scope="module")
def checkpoint_and_data(tmp_path_factory):
    """A tiny GPT-2 HF checkpoint with the world's word tokenizer, saved as a user would have it."""
    root = tmp_path_factory.mktemp("cli")
    world = planted_world(num_groups=2, group_sizes=(3, 3), pairs_per_user=8, seed=0)
    tokenizer = world.tokenizer()
    save_word_gpt2(root / "ckpt", tokenizer)
    rows = [{"user_id": r.user_id, "prompt": r.prompt, "chosen": r.chosen, "rejected": r.rejected}
            for r in world.preference_rows(0)]
    (root / "prefs.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (root / "prompts.txt").write_text("\n".join(world.prompts(16, 0)))
    return root


def test_fit_rewards_then_train_policy(checkpoint_and_data, capsys):
    root = checkpoint_and_data
    assert main(["fit-rewards", "--data", str(root / "prefs.jsonl"), "--model", str(root / "ckpt"),
                 "--num-groups", "2", "--out", str(root / "rewards"), "--rounds", "2", "--steps", "5",
                 "--batch-size", "16"]) == 0
    assignments = json.loads((root / "rewards" / "assignments.json").read_text())
    assert len(assignments) == 6 and set(assignments.values()) <= {0, 1}
    assert (root / "rewards" / "em_history.json").exists()

    assert main(["train-policy", "--model", str(root / "ckpt"), "--rewards", str(root / "rewards"),
                 "--prompts", str(root / "prompts.txt"), "--objective", "maxmin", "--out", str(root / "policy"),
                 "--iterations", "2", "--batch-size", "4", "--max-new-tokens", "6"]) == 0
    metrics = json.loads((root / "policy" / "metrics.json").read_text())
    assert len(metrics["curve"]) == 2 and np.isfinite(metrics["curve"][-1]["score"])
    # Asking for one more iteration resumes from the checkpoint of iteration 2 instead of starting over.
    assert main(["train-policy", "--model", str(root / "ckpt"), "--rewards", str(root / "rewards"),
                 "--prompts", str(root / "prompts.txt"), "--objective", "maxmin", "--out", str(root / "policy"),
                 "--iterations", "3", "--batch-size", "4", "--max-new-tokens", "6"]) == 0
    assert "resumed from iteration 2" in capsys.readouterr().out
    resumed = json.loads((root / "policy" / "metrics.json").read_text())["curve"]
    assert len(resumed) == 3 and resumed[:2] == metrics["curve"]
    from maxmin_jax import load_pretrained

    load_pretrained(root / "policy" / "policy")  # the trained policy is a loadable HF checkpoint


def test_bad_rows_are_reported_with_file_and_row(checkpoint_and_data, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"user_id": "u1", "prompt": "p", "chosen": "same", "rejected": "same"}) + "\n")
    code = main(["fit-rewards", "--data", str(bad), "--model", str(checkpoint_and_data / "ckpt"),
                 "--num-groups", "2", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "bad.jsonl" in err and "row 1" in err


def test_unknown_config_key_is_named(tmp_path, capsys):
    config = tmp_path / "x.yaml"
    config.write_text("ppo:\n  learning_rat: 0.1\n")
    assert main(["run", str(config), "--out", str(tmp_path / "o")]) == 2
    assert "learning_rat" in capsys.readouterr().err
