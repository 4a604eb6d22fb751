"""Logit parity with transformers' PyTorch models, presets, round trips and strict loading."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import AutoModelForCausalLM

from maxmin_jax import CheckpointError, GPT2Config, LlamaConfig, build_model, load_pretrained, save_pretrained
from maxmin_jax.models.config import ConfigError
from maxmin_jax.models.hf import read_checkpoint


def left_padded_batch(seed=0, batch=3, length=9, vocab=100):
    rng = np.random.RandomState(seed)
    ids = rng.randint(3, vocab, (batch, length))
    mask = np.ones((batch, length), np.int64)
    mask[0, :4] = 0
    mask[2, :1] = 0
    ids[mask == 0] = 0
    return ids, mask


def hf_logits(directory, ids, mask):
    model = AutoModelForCausalLM.from_pretrained(directory).eval()
    positions = np.maximum(mask.cumsum(-1) - 1, 0)  # what HF generate passes for left padding
    with torch.no_grad():
        return model(torch.tensor(ids), attention_mask=torch.tensor(mask),
                     position_ids=torch.tensor(positions)).logits.numpy()


def assert_logits_match(directory, **load_kwargs):
    ids, mask = left_padded_batch()
    ref = hf_logits(directory, ids, mask)
    out = np.asarray(load_pretrained(directory, **load_kwargs)(jnp.asarray(ids), jnp.asarray(mask)))
    real = mask.astype(bool)
    rel = np.linalg.norm(out[real] - ref[real]) / np.linalg.norm(ref[real])
    assert rel < 1e-4, rel


def test_gpt2_logits_match_transformers(tiny_gpt2_dir):
    assert_logits_match(tiny_gpt2_dir)


@pytest.mark.parametrize("variant", ["mha", "gqa", "mqa", "gqa_tied"])
def test_llama_logits_match_transformers(tiny_llama_dirs, variant):
    assert_logits_match(tiny_llama_dirs[variant])


@pytest.mark.parametrize("config", [GPT2Config.tiny(), LlamaConfig.tiny()], ids=["gpt2", "llama"])
def test_scanned_and_unrolled_layers_agree(config):
    ids, mask = left_padded_batch(vocab=config.vocab_size)
    scanned = build_model(config, rngs=nnx.Rngs(0))
    unrolled = build_model(config, rngs=nnx.Rngs(0), scan_layers=False)
    np.testing.assert_allclose(scanned(ids, mask), unrolled(ids, mask), rtol=1e-5, atol=1e-5)


def test_remat_keeps_values_and_gradients():
    config = GPT2Config.tiny()
    ids, mask = left_padded_batch(vocab=config.vocab_size)

    def loss_and_grad(model):
        graphdef, state = nnx.split(model)
        return jax.value_and_grad(lambda s: nnx.merge(graphdef, s)(ids, mask).mean())(state)

    plain_loss, plain_grad = loss_and_grad(build_model(config, rngs=nnx.Rngs(0)))
    remat_loss, remat_grad = loss_and_grad(build_model(config, rngs=nnx.Rngs(0), remat="full"))
    np.testing.assert_allclose(plain_loss, remat_loss, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(plain_grad), jax.tree.leaves(remat_grad)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_bfloat16_close_to_float32(tiny_llama_dirs):
    ids, mask = left_padded_batch()
    f32 = np.asarray(load_pretrained(tiny_llama_dirs["gqa"])(ids, mask))
    model = load_pretrained(tiny_llama_dirs["gqa"], dtype=jnp.bfloat16)
    assert model.layers.q.get_value().dtype == jnp.bfloat16
    bf16 = np.asarray(model(ids, mask))
    real = mask.astype(bool)
    assert np.linalg.norm(bf16[real] - f32[real]) / np.linalg.norm(f32[real]) < 2e-2


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_hf_round_trip_reproduces_tensors(tiny_gpt2_dir, tiny_llama_dirs, tmp_path, name):
    source = tiny_gpt2_dir if name == "gpt2" else tiny_llama_dirs["gqa"]
    save_pretrained(load_pretrained(source), tmp_path / "export")
    original, exported = read_checkpoint(source), read_checkpoint(tmp_path / "export")
    assert set(original) == set(exported)
    for key in original:
        np.testing.assert_array_equal(original[key], exported[key], err_msg=key)
    # transformers itself loads the export and computes the same logits.
    ids, mask = left_padded_batch()
    np.testing.assert_allclose(hf_logits(tmp_path / "export", ids, mask), hf_logits(source, ids, mask), atol=1e-6)


def test_sharded_index_and_pytorch_bin_checkpoints(tmp_path):
    from transformers import LlamaConfig as HFLlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    hf = LlamaForCausalLM(HFLlamaConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4,
                                        num_key_value_heads=2, intermediate_size=64, vocab_size=100))
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    assert_logits_match(tmp_path / "sharded")
    torch.save(hf.state_dict(), tmp_path / "bin.pt")
    (tmp_path / "bin").mkdir()
    shutil.copy(tmp_path / "sharded" / "config.json", tmp_path / "bin" / "config.json")
    shutil.move(tmp_path / "bin.pt", tmp_path / "bin" / "pytorch_model.bin")
    assert_logits_match(tmp_path / "bin")


def test_presets_parameter_counts_without_allocation():
    def count(config):
        abstract = nnx.eval_shape(lambda: build_model(config, rngs=nnx.Rngs(0)))
        return sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))

    # Published sizes: GPT-2 124M and 1.5B (tied head), Llama-2-7B / Tulu2-7B (untied head).
    assert count(GPT2Config.gpt2()) == 124_439_808
    assert count(GPT2Config.gpt2_medium()) == 354_823_168
    assert count(GPT2Config.gpt2_xl()) == 1_557_611_200
    assert count(LlamaConfig.llama2_7b()) == 6_738_415_616
    assert count(LlamaConfig.tulu2_7b()) == 6_738_415_616


def _copy_checkpoint(source, tmp_path, edit):
    from safetensors.numpy import save_file

    target = tmp_path / "edited"
    target.mkdir()
    config = json.loads((source / "config.json").read_text())
    tensors = {k: np.array(v) for k, v in read_checkpoint(source).items()}
    edit(config, tensors)
    (target / "config.json").write_text(json.dumps(config))
    save_file(tensors, target / "model.safetensors")
    return target


@pytest.mark.parametrize("edit, message", [
    (lambda c, t: t.pop("model.layers.1.mlp.up_proj.weight"), "missing keys: .*layers.1.mlp.up_proj"),
    (lambda c, t: t.update({"model.layers.0.extra.weight": np.zeros(3, np.float32)}),
     "unused keys.*layers.0.extra.weight"),
    (lambda c, t: t.update({"model.norm.weight": np.zeros(7, np.float32)}), "shape mismatches: model.norm.weight"),
])
def test_bad_checkpoints_are_refused_naming_keys(tiny_llama_dirs, tmp_path, edit, message):
    with pytest.raises(CheckpointError, match=message):
        load_pretrained(_copy_checkpoint(tiny_llama_dirs["gqa"], tmp_path, edit))


@pytest.mark.parametrize("edit, message", [
    (lambda c, t: c.update(model_type="mistral"), "unknown model_type 'mistral'"),
    (lambda c, t: c.update(rope_scaling={"rope_type": "linear", "factor": 2.0}), "rope_type 'linear'"),
    (lambda c, t: c.update(sliding_window=128), "fields this loader does not handle: \\['sliding_window'\\]"),
    (lambda c, t: c.update(hidden_act="gelu"), "unsupported settings"),
])
def test_unsupported_configs_are_refused(tiny_llama_dirs, tmp_path, edit, message):
    with pytest.raises(ConfigError, match=message):
        load_pretrained(_copy_checkpoint(tiny_llama_dirs["gqa"], tmp_path, edit))


def test_missing_directory_is_reported(tmp_path):
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        load_pretrained(tmp_path / "nope" / "model.safetensors")
    with pytest.raises(CheckpointError, match="no config.json"):
        load_pretrained(tmp_path)
