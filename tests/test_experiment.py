"""End to end on the review world (10:1), as a user runs it (`maxmin-jax demo`, in a process of its own with XLA's
default optimisations: this run is long enough for them to pay): SFT -> EM (K=2) -> PPO with `single` and
`maxmin` -> true rewards.

The paper's GPT-2 finding, asserted with margins: the single reward serves the majority ("positive"), and MaxMin
lifts the minority ("concise") clearly above what single gives it while the majority stays clearly above the
reference. Rewards are in units of the reference policy's std (reference = 0). A run of this configuration on the
project's 2-core CPU gave (single positive, single concise, maxmin positive, maxmin concise) = (+1.53, +0.32, +0.58,
+1.02) for seed 0 (the test's; ARI 1.0), and a larger variant (150 SFT steps, 80 single-reward steps) (+1.81, +0.33,
+0.64, +1.19); after the accelerator path (float32 log-probs via logsumexp, fused attention) seed 0 gave maxmin's
majority +0.25. With seed 1 (world and run) the two EM rounds from the round-robin start stayed in a split that
mixes the groups (ARI -0.01), and MaxMin then has no minority head to serve: the first assertion names that failure.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from maxmin_jax.pipeline import load_config

ROOT = Path(__file__).resolve().parents[1]
# The demo, smaller: fewer SFT examples and steps, two EM rounds, two objectives, fewer iterations and samples.
OVERRIDES = ["model.sft_examples=2048", "model.sft.steps=120", "rewards.em.rounds=2", "rewards.single_reward_steps=60",
             "policy.objectives=[single, maxmin]", "policy.iterations=25", "evaluation.standardizer_prompts=128",
             "evaluation.prompts=256"]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = tmp_path_factory.mktemp("experiment")
    assert load_config(None, overrides=OVERRIDES).seed == 0
    flags = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split() if "optimization_level" not in f)
    env = {**os.environ, "XLA_FLAGS": flags, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    args = [sys.executable, "-m", "maxmin_jax.cli", "demo", "--out", str(root / "out")]
    done = subprocess.run(args + [a for o in OVERRIDES for a in ("--set", o)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    report = json.loads((root / "out" / "report.json").read_text())
    report["out"] = root / "out"
    return report


def test_em_recovers_the_two_groups(report):
    assert report["em"]["ari"] >= 0.8
    assert sorted(report["em"]["cluster_groups"]) == ["concise", "positive"]


def test_single_serves_the_majority_and_maxmin_lifts_the_minority(report):
    single = report["policies"]["single"]["group_reward"]
    maxmin = report["policies"]["maxmin"]["group_reward"]
    assert single["positive"] > single["concise"] + 0.3  # single favours the majority
    assert maxmin["concise"] > single["concise"] + 0.2  # MaxMin lifts the minority clearly above single
    assert maxmin["positive"] > 0.0  # ... while the majority stays above the reference
    assert min(maxmin.values()) > min(single.values())  # the worst-off group is better off


def test_report_files_follow_the_public_schema(report):
    out = report["out"]
    saved = json.loads((out / "report.json").read_text())
    assert saved["groups"] == ["positive", "concise"]
    assert "ari" in saved["em"]
    for name in ("reference", "single", "maxmin"):
        assert set(saved["policies"][name]["group_reward"]) == {"positive", "concise"}
    assert saved["policies"]["maxmin"]["objective"] == "maxmin" and saved["policies"]["maxmin"]["algorithm"] == "ppo"
    assert saved["policies"]["reference"]["group_reward"] == {"positive": 0.0, "concise": 0.0}
    assert (out / "group_rewards.png").stat().st_size > 0 and (out / "curves.png").stat().st_size > 0
