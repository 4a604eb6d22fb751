"""The pretrained-model runner end to end on local files (a tiny GPT-2 HF checkpoint, P-Soups-layout preference
files, a prompts file), sharded over the 8 simulated CPU devices; the shipped configs parse; a wrong mesh is named."""

import json
from pathlib import Path

import numpy as np
import pytest

from maxmin_jax.config_io import ConfigFileError, load_yaml
from conftest import save_word_gpt2
from maxmin_jax.data.synthetic import planted_world
from maxmin_jax.pretrained_config import PretrainedExperimentConfig, is_pretrained_config
from maxmin_jax.pretrained_experiment import FrozenParam, freeze_base, run_config_file, run_pretrained_experiment

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


@pytest.fixture(scope="module")
def local_files(tmp_path_factory):
    """A tiny GPT-2 checkpoint with the world's word tokenizer, one P-Soups file per planted group, prompts."""
    root = tmp_path_factory.mktemp("pretrained")
    world = planted_world(num_groups=2, group_sizes=(3, 3), pairs_per_user=8, seed=0)
    tokenizer = world.tokenizer()
    save_word_gpt2(root / "ckpt", tokenizer)
    for group in world.group_names:
        rows = [{"user_input": r.prompt, "completion_a": r.chosen, "completion_b": r.rejected}
                for r in world.preference_rows(0) if r.group == group]
        (root / f"{group}.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (root / "prompts.txt").write_text("\n".join(world.prompts(32, 0)))
    return root


def _config(root: Path, **mesh) -> str:
    return f"""
experiment: pretrained
policy: {root / 'ckpt'}
dtype: float32
mesh: {json.dumps(mesh or {'data': 2, 'fsdp': 4, 'tensor': 1})}
lora:
  policy: {{rank: 4, alpha: 8}}
  reward: {{rank: 4, alpha: 8}}
preferences:
  psoups: {{g0: {root / 'g0.jsonl'}, g1: {root / 'g1.jsonl'}}}
  users_per_group: 3
  heldout_fraction: 0.2
prompts: {{source: {root / 'prompts.txt'}, max_tokens: 3}}
em: {{num_groups: 2, rounds: 1, steps_per_round: 4, batch_size: 16, chunk_size: 32, m_step: {{learning_rate: 0.001}}}}
single_reward_steps: 4
objectives: [single, maxmin]
ppo: {{learning_rate: 0.01, epochs: 1, minibatches: 2}}
rollout: {{max_new_tokens: 6}}
iterations: 2
prompt_batch: 8
standardizer_prompts: 16
eval_prompts: 16
eval_batch_size: 8
seed: 0
"""


def test_runner_end_to_end_with_lora_on_a_mesh(local_files, tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text(_config(local_files))
    assert is_pretrained_config(path) and not is_pretrained_config(CONFIGS / "demo.yaml")
    out = tmp_path / "out"
    assert run_config_file(path, out, progress=False) == 0  # what `maxmin-jax run` calls for these files

    saved = json.loads((out / "report.json").read_text())
    printed = capsys.readouterr().out
    assert all(g in printed for g in saved["groups"]) and "learned" in printed
    assert saved["experiment"] == "pretrained" and saved["mesh"] == {"data": 2, "fsdp": 4, "tensor": 1}
    assert sorted(saved["file_groups"]) == ["g0", "g1"] and saved["file_group_sizes"] == {"g0": 3, "g1": 3}
    assert len(saved["groups"]) == 2 and set(saved["groups"]) <= {"g0", "g1", "g0#1", "g1#1"}
    assert -1.0 <= saved["em"]["ari"] <= 1.0 and len(saved["em"]["weights"]) == 2
    assert saved["em"]["users"] == 6 and saved["em"]["heldout"]["mixture"]["num_pairs"] > 0
    assert "learned" in saved["group_reward_kind"]
    assert set(saved["policies"]) == {"reference", "single", "maxmin"}
    for name, policy in saved["policies"].items():
        assert set(policy["group_reward"]) == set(saved["groups"])
        assert policy["group_reward"] == {g: policy["learned_reward"][f"head{k}"]
                                          for k, g in enumerate(saved["groups"])}
        assert "single" in policy["learned_reward"] and np.isfinite(policy["kl"])
        assert policy["worst_group_reward"] == min(policy["group_reward"].values())
    assert all(abs(v) < 1e-5 for v in saved["policies"]["reference"]["group_reward"].values())
    assert [len(c) for c in saved["curves"].values()] == [2, 2]
    assert {p.name for p in out.iterdir()} >= {"report.json", "table.txt", "group_rewards.png", "assignments.json"}
    assert len(json.loads((out / "assignments.json").read_text())) == 6

    # Only LoRA adapters and the value head were trained, and the adapters moved (B starts at zero).
    for name in ("single", "maxmin"):
        trainable = np.load(out / "policies" / name / "trainable.npz")
        assert sorted(trainable.files) == ["lm/layers/qkv_lora_a", "lm/layers/qkv_lora_b", "value_bias",
                                           "value_head"]
        assert np.abs(trainable["lm/layers/qkv_lora_b"]).max() > 0


def test_mesh_must_match_the_devices(local_files, tmp_path):
    path = tmp_path / "bad_mesh.yaml"
    path.write_text(_config(local_files, data=1, fsdp=4, tensor=1))
    cfg = load_yaml(PretrainedExperimentConfig, path)
    with pytest.raises(ValueError, match=r"needs 4 devices, but JAX sees 8 .*data \* fsdp \* tensor = 8"):
        run_pretrained_experiment(cfg, tmp_path / "out", progress=False)


def test_freeze_base_leaves_only_adapters_and_heads_as_params(tiny_gpt2_dir):
    """The EM M-step trains every nnx.Param; under reward LoRA the base weights are retyped out of that set."""
    from flax import nnx

    from maxmin_jax.models.hf import load_pretrained
    from maxmin_jax.models.lora import add_lora
    from maxmin_jax.rewards.model import RewardModel

    base = load_pretrained(tiny_gpt2_dir)
    backbone = freeze_base(add_lora(nnx.clone(base), rank=2, rngs=nnx.Rngs(0)))
    model = RewardModel.from_backbone(backbone, 2, nnx.Rngs(0))
    params = {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    assert params == {"backbone/layers/qkv_lora_a", "backbone/layers/qkv_lora_b", "head", "head_bias"}
    assert isinstance(backbone.layers.qkv, FrozenParam) and type(base.layers.qkv) is nnx.Param
    assert backbone.layers.qkv.get_value() is base.layers.qkv.get_value()  # shared, not copied


@pytest.mark.parametrize("name", ["gpt2_imdb.yaml", "tulu2_7b_psoups.yaml"])
def test_shipped_configs_parse(name):
    assert is_pretrained_config(CONFIGS / name)
    cfg = load_yaml(PretrainedExperimentConfig, CONFIGS / name)
    assert cfg.objectives and cfg.mesh.size >= 1


def test_configs_are_strict(local_files, tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text(_config(local_files).replace("users_per_group", "user_per_group"))
    with pytest.raises(ConfigFileError, match="user_per_group"):
        load_yaml(PretrainedExperimentConfig, path)
    path.write_text(_config(local_files).replace("  users_per_group: 3\n", "  files: x.jsonl\n"))
    with pytest.raises(ConfigFileError, match="exactly one of psoups"):
        load_yaml(PretrainedExperimentConfig, path)
