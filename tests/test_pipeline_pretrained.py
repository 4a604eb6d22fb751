"""The pipeline on pretrained HF models and preference files: a tiny GPT-2 checkpoint, P-Soups-layout files and a
prompts file, with LoRA on the policy and the reward backbone, sharded over the 8 simulated CPU devices; the report
on real data (no true rewards: each EM cluster's learned head); a wrong mesh is refused before anything loads."""

import json
from pathlib import Path

import numpy as np
import pytest
from flax import nnx

from conftest import save_word_gpt2
from maxmin_jax.cli import main
from maxmin_jax.config_io import ConfigError
from maxmin_jax.data.synthetic import planted_world
from maxmin_jax.pipeline import load_config, run
from maxmin_jax.trainable import trainable_filter


@pytest.fixture(scope="module")
def local_files(tmp_path_factory):
    """A tiny GPT-2 checkpoint with the world's word tokenizer, one P-Soups file per planted group, prompts."""
    root = tmp_path_factory.mktemp("pretrained")
    world = planted_world(num_groups=2, group_sizes=(3, 3), pairs_per_user=8, seed=0)
    save_word_gpt2(root / "ckpt", world.tokenizer())
    for group in world.group_names:
        rows = [{"user_input": r.prompt, "completion_a": r.chosen, "completion_b": r.rejected}
                for r in world.preference_rows(0) if r.group == group]
        (root / f"{group}.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (root / "prompts.txt").write_text("\n".join(world.prompts(32, 0)))
    return root


def config_text(root: Path, **mesh) -> str:
    return f"""
model: {{source: pretrained, policy: {root / 'ckpt'}, dtype: float32}}
mesh: {json.dumps(mesh or {'data': 2, 'fsdp': 4, 'tensor': 1})}
lora:
  policy: {{rank: 4, alpha: 8}}
  reward: {{rank: 4, alpha: 8}}
preferences:
  source: psoups
  files: {{g0: {root / 'g0.jsonl'}, g1: {root / 'g1.jsonl'}}}
  users_per_group: 3
  heldout_fraction: 0.2
prompts: {{source: {root / 'prompts.txt'}, max_tokens: 3}}
rewards:
  em: {{num_groups: 2, rounds: 1, steps_per_round: 4, batch_size: 16, chunk_size: 32, m_step: {{learning_rate: 0.001}}}}
  single_reward_steps: 4
sampling: {{max_new_tokens: 6}}
policy:
  objectives: [maxmin]
  ppo: {{learning_rate: 0.01, epochs: 1, minibatches: 2}}
  iterations: 2
  prompt_batch: 8
evaluation: {{standardizer_prompts: 16, prompts: 16, batch_size: 8}}
"""


def test_pretrained_run_with_lora_on_a_mesh(local_files, tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text(config_text(local_files))
    out = tmp_path / "out"
    assert main(["run", str(path), "--out", str(out)]) == 0

    saved = json.loads((out / "report.json").read_text())
    printed = capsys.readouterr().out
    assert all(g in printed for g in saved["groups"]) and "learned" in printed
    assert saved["mesh"] == {"data": 2, "fsdp": 4, "tensor": 1}
    assert saved["file_groups"] == ["g0", "g1"] and saved["file_group_sizes"] == {"g0": 3, "g1": 3}
    assert len(saved["groups"]) == 2 and set(saved["groups"]) <= {"g0", "g1", "g0#1", "g1#1"}
    assert saved["em"]["users"] == 6 and saved["em"]["heldout"]["mixture"]["num_pairs"] > 0
    assert saved["group_reward_kind"].startswith("learned")
    assert list(saved["policies"]) == ["reference", "maxmin"]
    for name, policy in saved["policies"].items():
        assert policy["group_reward"] == {g: policy["learned_reward"][f"head{k}"]
                                          for k, g in enumerate(saved["groups"])}
        assert "single" in policy["learned_reward"] and np.isfinite(policy["kl"])
        assert policy["worst_group_reward"] == min(policy["group_reward"].values())
    assert all(abs(v) < 1e-5 for v in saved["policies"]["reference"]["group_reward"].values())
    assert [len(c) for c in saved["curves"].values()] == [2]

    # Only LoRA adapters and the value head were trained and exported, and the adapters moved (B starts at zero).
    trainable = np.load(out / "policies" / "maxmin" / "trainable.npz")
    assert sorted(trainable.files) == ["lm/layers/qkv_lora_a", "lm/layers/qkv_lora_b", "value_bias", "value_head"]
    assert np.abs(trainable["lm/layers/qkv_lora_b"]).max() > 0


def test_mesh_must_match_the_devices(local_files, tmp_path):
    path = tmp_path / "bad_mesh.yaml"
    path.write_text(config_text(local_files, data=1, fsdp=4, tensor=1))
    with pytest.raises(ConfigError, match=r"needs 4 devices, but JAX sees 8 .*data \* fsdp \* tensor = 8"):
        run(load_config(path), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()  # refused before anything is written or loaded


def test_under_lora_only_adapters_and_heads_train(tiny_gpt2_dir):
    """One filter says what trains in every trainer: under LoRA the reward model's adapters and heads, nothing of
    the base weights, which stay shared with the base model (no copy)."""
    from maxmin_jax.models.hf import load_pretrained
    from maxmin_jax.models.lora import add_lora
    from maxmin_jax.policy.model import PolicyWithValue
    from maxmin_jax.rewards.model import RewardModel

    base = load_pretrained(tiny_gpt2_dir)
    reward = RewardModel.from_backbone(add_lora(nnx.clone(base), rank=2, rngs=nnx.Rngs(0)), 2, nnx.Rngs(0))
    selected = {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(reward, trainable_filter(lora=True)))}
    assert selected == {"backbone/layers/qkv_lora_a", "backbone/layers/qkv_lora_b", "head", "head_bias"}
    policy = PolicyWithValue(add_lora(nnx.clone(base), rank=2, rngs=nnx.Rngs(0)))
    selected = {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(policy, trainable_filter(lora=True)))}
    assert selected == {"lm/layers/qkv_lora_a", "lm/layers/qkv_lora_b", "value_head", "value_bias"}
    assert reward.backbone.layers.qkv.get_value() is base.layers.qkv.get_value()  # shared, not copied
