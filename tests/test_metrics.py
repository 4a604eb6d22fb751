"""The metrics stream: records per step in metrics.jsonl, TensorBoard scalars per stage, and a resume that drops
what a crash left half-done (records after the resumed step, a line cut short)."""

import json

import numpy as np

from conftest import read_tfevents
from maxmin_jax.metrics import MetricsWriter, read_records


def test_records_and_scalars(tmp_path):
    with MetricsWriter(tmp_path) as writer:
        for step in (1, 2):
            metrics = {"kl": np.float32(0.5 * step), "group_reward": np.array([1.0, 2.0])}
            writer.write("policy/maxmin/ppo", step, metrics, group_names=["positive", "concise"])
        writer.write("sft", 1, {"loss": 3.0})
    records = read_records(tmp_path / "metrics.jsonl")
    assert [(r["stage"], r["step"]) for r in records] == [("policy/maxmin/ppo", 1), ("policy/maxmin/ppo", 2),
                                                           ("sft", 1)]
    assert records[1]["kl"] == 1.0 and records[1]["group_reward"] == [1.0, 2.0] and "time" in records[1]
    scalars = read_tfevents(tmp_path / "tensorboard" / "policy" / "maxmin" / "ppo")
    assert scalars["kl"] == [(1, 0.5), (2, 1.0)] and scalars["group_reward/concise"] == [(1, 2.0), (2, 2.0)]


def test_resume_drops_what_came_after_the_checkpoint(tmp_path):
    with MetricsWriter(tmp_path) as writer:
        for step in (1, 2, 3):
            writer.write("policy/a", step, {"kl": step})
        writer.write("policy/b", 1, {"kl": 9})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"stage": "policy/a", "step": 4, "kl"')  # a line a crash cut short
    with MetricsWriter(tmp_path) as writer:
        kept = writer.resume("policy/a", 2)
        assert [r["step"] for r in kept] == [1, 2]
        writer.write("policy/a", 3, {"kl": 30})
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [(json.loads(x)["stage"], json.loads(x)["step"]) for x in lines] == [
        ("policy/a", 1), ("policy/a", 2), ("policy/b", 1), ("policy/a", 3)]
    assert json.loads(lines[-1])["kl"] == 30
