"""End to end on the review world (10:1), as a user runs it (`maxmin-jax demo`, in a process of its own with XLA's
default optimisations: this run is long enough for them to pay): SFT -> EM (K=2) -> PPO with `single` and
`maxmin` -> true rewards; then `demo --algorithm grpo --algorithm dpo` over the same stages (critic-free and
offline, 10 iterations each).

The paper's GPT-2 finding, asserted with margins: the single reward serves the majority ("positive"), and MaxMin
lifts the minority ("concise") clearly above what single gives it while the majority stays above the reference.
Rewards are in units of the reference policy's std (reference = 0).

The run is the demo at its own sizes, with two objectives and fewer evaluation prompts. A smaller run (2048 SFT
examples, 120 SFT steps, 2 EM rounds, 60 single-reward steps, 25 iterations) asserted noise: with the same
partition (ARI 1.0) and reward models of the same held-out accuracy (0.879), MaxMin's majority moved from +0.41 to
-0.13 when only the start's responsibilities changed, and single's minority from +0.08 to +0.44 under other XLA
flags. Here, seed 0 (world and run), this suite's flags: (single positive, single concise, maxmin positive, maxmin
concise) = (+2.16, -0.44, +1.11, +0.68), ARI 1.0; about 10 s more than the smaller run. With seed 1 an earlier
version's two EM rounds from the round-robin start once stayed in a split that mixed the groups (ARI -0.01), and
MaxMin then had no minority head to serve: the first assertion names that failure.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import COMPILE_FLAGS
from maxmin_jax.pipeline import load_config

ROOT = Path(__file__).resolve().parents[1]
# The demo at its own sizes, with two objectives and fewer evaluation prompts (docstring: why not smaller).
OVERRIDES = ["policy.objectives=[single, maxmin]", "evaluation.standardizer_prompts=128", "evaluation.prompts=256"]


def demo(out: Path, *args: str) -> dict:
    test_only = {flag.split("=")[0] for flag in COMPILE_FLAGS}  # compiled as users compile it
    flags = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split() if f.split("=")[0] not in test_only)
    env = {**os.environ, "XLA_FLAGS": flags, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    command = [sys.executable, "-m", "maxmin_jax.cli", "demo", "--out", str(out)]
    done = subprocess.run(command + [a for o in OVERRIDES for a in ("--set", o)] + list(args), env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    report["out"] = out
    return report


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    assert load_config(None, overrides=OVERRIDES).seed == 0
    return demo(tmp_path_factory.mktemp("experiment") / "out")


@pytest.fixture(scope="module")
def algorithms_report(report, tmp_path_factory):
    """`demo --algorithm grpo --algorithm dpo` over a copy of the PPO run: SFT, EM and standardisation are read
    back, and GRPO and DPO train single and maxmin from the same start for 10 iterations each (GRPO: 16 prompts x 4
    samples, PPO's 64 responses; DPO: 64 of the world's pairs per step in the EM groups)."""
    out = tmp_path_factory.mktemp("algorithms") / "out"
    shutil.copytree(report["out"], out)
    return demo(out, "--algorithm", "grpo", "--algorithm", "dpo", "--set", "policy.iterations=10")


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


def test_no_policy_jumps_on_its_last_update(report, algorithms_report):
    """The update's KL early stop (on in the demo) keeps the last update from moving the policy where its rollouts
    never went: each online policy's KL to the reference at evaluation stays near its last iteration's (a demo
    single policy without the stop once went from 4.8 nats there to 115 at evaluation; docs/report.md). Measured
    here (last iteration -> evaluation): single 11.7 -> 9.5, maxmin 10.7 -> 13.4, GRPO 13.4 -> 15.4 and 5.7 -> 3.3."""
    for source in (report, algorithms_report):
        for name, policy in source["policies"].items():
            curve = source["curves"].get(name) or []
            if policy.get("algorithm") not in ("ppo", "grpo") or not curve:
                continue
            assert all(m["update_steps"] <= 4 for m in curve), name  # epochs x minibatches, the stop's metric
            assert policy["kl"] < 1.5 * curve[-1]["kl"] + 1.0, (name, policy["kl"], curve[-1]["kl"])


@pytest.mark.parametrize("algorithm", ["grpo", "dpo"])
def test_maxmin_lifts_the_minority_with_critic_free_and_offline_algorithms(algorithms_report, algorithm):
    """The same comparison within one algorithm, on the same evaluation prompts. Measured (2-core CPU) for this
    configuration: the minority under single / maxmin -1.73 / +0.87 with GRPO, -0.57 / +0.00 with DPO (the earlier,
    smaller run: -1.60 / +0.84 and -0.96 / +0.24; benchmarks/review_algorithms.py at the demo's full size: -1.76 /
    +0.79 and -0.65 / +0.01)."""
    policies = algorithms_report["policies"]
    single, maxmin = policies[f"single-{algorithm}"], policies[f"maxmin-{algorithm}"]
    assert (single["algorithm"], maxmin["algorithm"], maxmin["iterations"]) == (algorithm, algorithm, 10)
    assert maxmin["group_reward"]["concise"] > single["group_reward"]["concise"] + 0.2
    assert maxmin["worst_group_reward"] > single["worst_group_reward"]


def test_report_files_follow_the_public_schema(report):
    out = report["out"]
    saved = json.loads((out / "report.json").read_text())
    assert saved["groups"] == ["positive", "concise"]
    assert "ari" in saved["em"]
    # 10 minority users: enough held-out pairs to tell that each group's head learned its preference.
    assert {g: e["status"] for g, e in saved["group_heads"].items()} == {"positive": "ok", "concise": "ok"}
    assert "\n! " not in (out / "table.txt").read_text()
    for name in ("reference", "single", "maxmin"):
        assert set(saved["policies"][name]["group_reward"]) == {"positive", "concise"}
    assert saved["policies"]["maxmin"]["objective"] == "maxmin" and saved["policies"]["maxmin"]["algorithm"] == "ppo"
    assert saved["policies"]["reference"]["group_reward"] == {"positive": 0.0, "concise": 0.0}
    for name in ("group_rewards.png", "win_rates.png", "curves.png", "table.txt"):
        assert (out / name).stat().st_size > 0, name
    # Win rates of every trained policy, per group, with intervals around them (docs/report.md).
    maxmin = saved["policies"]["maxmin"]
    assert saved["policies"]["single"]["win_rate_vs_single"] is None and maxmin["win_rate_vs_single"] is not None
    for key in ("win_rate_vs_reference", "win_rate_vs_single"):
        for group, entry in maxmin[key].items():
            lo, hi = entry["ci"]
            assert lo <= entry["rate"] <= hi and lo < hi, (key, group, entry)
    lo, hi = maxmin["group_reward_ci"]["concise"]
    assert lo <= maxmin["group_reward"]["concise"] <= hi
    assert saved["win_rates"]["concise"]["maxmin"]["single"] == maxmin["win_rate_vs_single"]["concise"]
