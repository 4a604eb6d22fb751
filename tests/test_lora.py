"""LoRA adapters: exact identity at init, base path without adapters, adapter-only training, merging, sharding."""

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from maxmin_jax.models import GPT2Config, LlamaConfig, build_model
from maxmin_jax.models.lora import (LORA_SPECS, add_lora, base_filter, lora_filter, lora_scale, lora_targets,
                                    merge_lora, resolve_targets)
from maxmin_jax.models.transformer import CausalLM
from maxmin_jax.sharding import make_mesh, shard_module

CONFIGS = {"gpt2": GPT2Config.tiny(), "llama": LlamaConfig.tiny()}


def _ids(seed=1, b=2, t=8):
    return jax.random.randint(jax.random.key(seed), (b, t), 0, 128)


@nnx.jit(static_argnames="use_lora")
def _logits(model, ids, use_lora=True):
    return model(ids, use_lora=use_lora)


def _randomise_b(model, seed=3, scale=0.1):
    """Non-zero B so adapters actually change the output."""
    key = jax.random.key(seed)
    for name in lora_targets(model):
        var = getattr(model.layers, f"{name}_lora_b")
        key, sub = jax.random.split(key)
        var.set_value(scale * jax.random.normal(sub, var.get_value().shape, var.get_value().dtype))


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_specs_match_block_einsums(family, monkeypatch):
    """LORA_SPECS must be the einsums the family's `_block` really passes to `lora_project`."""
    seen = {}
    original = CausalLM.lora_project

    def record(self, p, name, x, spec):
        seen[name] = spec
        return original(self, p, name, x, spec)

    monkeypatch.setattr(CausalLM, "lora_project", record)
    model = build_model(CONFIGS[family], rngs=nnx.Rngs(0), scan_layers=False)
    jax.eval_shape(lambda ids: model(ids), _ids())  # trace only
    assert seen == LORA_SPECS[family]


@pytest.mark.parametrize("scan", [True, False], ids=["scan", "unrolled"])
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_zero_init_is_identity_and_use_lora_false_is_base(family, scan):
    model = build_model(CONFIGS[family], rngs=nnx.Rngs(0), scan_layers=scan)
    ids = _ids()
    base = np.asarray(_logits(model, ids))
    add_lora(model, rank=4, alpha=8.0, rngs=nnx.Rngs(1))
    assert lora_targets(model) == resolve_targets(model, None)
    assert [lora_scale(model, name) for name in lora_targets(model)] == [2.0] * len(lora_targets(model))
    np.testing.assert_array_equal(np.asarray(_logits(model, ids)), base)

    # Every adaptable weight: B = 0 adds exact zeros, but XLA may schedule the extra matmul's neighbours
    # differently, so allow float32 rounding.
    full = build_model(CONFIGS[family], rngs=nnx.Rngs(0), scan_layers=scan)
    add_lora(full, rank=2, targets="all", rngs=nnx.Rngs(1))
    assert set(lora_targets(full)) == set(LORA_SPECS[family])
    np.testing.assert_allclose(np.asarray(_logits(full, ids)), base, atol=1e-6, rtol=0)

    _randomise_b(full)
    adapted = np.asarray(_logits(full, ids))
    assert np.abs(adapted - base).max() > 1e-3
    np.testing.assert_array_equal(np.asarray(_logits(full, ids, use_lora=False)), base)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_adapter_shapes_and_axes(family):
    model = build_model(CONFIGS[family], rngs=nnx.Rngs(0))
    add_lora(model, rank=3, targets="all", rngs=nnx.Rngs(1))
    c = CONFIGS[family]
    L, D = c.num_layers, c.hidden_size
    if family == "gpt2":
        a, b = model.layers.qkv_lora_a, model.layers.qkv_lora_b
        assert a.shape == (L, D, 3) and b.shape == (L, 3, 3, c.num_heads, c.head_dim)
        assert a.get_metadata()["logical_axes"] == ("layers", "embed", "lora_rank")
        assert b.get_metadata()["logical_axes"] == ("layers", "lora_rank", None, "heads", None)
        a = model.layers.attn_out_lora_a
        assert a.shape == (L, c.num_heads, c.head_dim, 3)
        assert a.get_metadata()["logical_axes"] == ("layers", "heads", None, "lora_rank")
    else:
        b = model.layers.k_lora_b
        assert b.shape == (L, 3, c.num_kv_heads, c.dim_per_head)
        assert b.get_metadata()["logical_axes"] == ("layers", "lora_rank", "kv_heads", None)
        a = model.layers.down_lora_a
        assert a.shape == (L, c.mlp_size, 3) and a.get_metadata()["logical_axes"] == ("layers", "mlp", "lora_rank")
    assert all(isinstance(v, nnx.LoRAParam) for _, v in nnx.to_flat_state(nnx.state(model, lora_filter)))
    assert not any(isinstance(v, nnx.LoRAParam) for _, v in nnx.to_flat_state(nnx.state(model, base_filter)))


def test_bad_arguments():
    model = build_model(CONFIGS["llama"], rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="unknown LoRA targets.*qkv"):
        add_lora(model, rank=2, targets=("qkv",), rngs=nnx.Rngs(1))
    with pytest.raises(ValueError, match="rank"):
        add_lora(model, rank=0, rngs=nnx.Rngs(1))
    add_lora(model, rank=2, rngs=nnx.Rngs(1))
    with pytest.raises(ValueError, match="already has LoRA"):
        add_lora(model, rank=2, targets=("q",), rngs=nnx.Rngs(1))


@pytest.mark.parametrize("family,scan", [("gpt2", True), ("llama", False)], ids=["gpt2-scan", "llama-unrolled"])
def test_training_changes_only_adapters_and_merge_matches(family, scan):
    model = build_model(CONFIGS[family], rngs=nnx.Rngs(0), scan_layers=scan)
    add_lora(model, rank=4, alpha=4.0, targets="all", rngs=nnx.Rngs(1))
    base_before = jax.tree.map(np.asarray, nnx.state(model, base_filter))
    lora_before = jax.tree.map(np.asarray, nnx.state(model, lora_filter))
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=lora_filter)
    ids = _ids(seed=5, b=4, t=12)

    @nnx.jit
    def train_step(model, optimizer, ids):
        def loss_fn(model):
            logits = model(ids[:, :-1])
            return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()

        loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, lora_filter))(model)
        optimizer.update(model, grads)
        return loss

    losses = [float(train_step(model, optimizer, ids)) for _ in range(5)]
    assert losses[-1] < losses[0]
    # The optimiser holds state for adapters only.
    opt_leaves = jax.tree.leaves(nnx.state(optimizer, nnx.OptState))
    assert sum(x.size for x in opt_leaves) <= 2 * sum(x.size for x in jax.tree.leaves(lora_before)) + 8

    base_after = jax.tree.map(np.asarray, nnx.state(model, base_filter))
    jax.tree.map(np.testing.assert_array_equal, base_after, base_before)
    lora_after = jax.tree.map(np.asarray, nnx.state(model, lora_filter))
    changed = jax.tree.map(lambda a, b: bool(np.any(a != b)), lora_after, lora_before)
    assert all(jax.tree.leaves(changed))

    ids_eval = _ids(seed=7)
    adapted = np.asarray(_logits(model, ids_eval))
    merge_lora(model)
    assert lora_targets(model) == ()
    assert not jax.tree.leaves(nnx.state(model, lora_filter))
    np.testing.assert_allclose(np.asarray(_logits(model, ids_eval)), adapted, atol=1e-5, rtol=1e-5)


def test_sharded_adapters_follow_logical_axes():
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    model = shard_module(build_model(CONFIGS["llama"], rngs=nnx.Rngs(0)), mesh)
    ids = _ids(b=4)
    base = np.asarray(_logits(model, ids))
    add_lora(model, rank=4, targets="all", rngs=nnx.Rngs(1), mesh=mesh)
    a, b = model.layers.q_lora_a.get_value(), model.layers.q_lora_b.get_value()
    assert a.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", None)
    assert b.sharding.spec == jax.sharding.PartitionSpec(None, None, "tensor", None)
    np.testing.assert_allclose(np.asarray(_logits(model, ids)), base, atol=1e-6, rtol=0)
    _randomise_b(model)
    adapted = np.asarray(_logits(model, ids))
    q_sharding = model.layers.q.get_value().sharding
    merge_lora(model)
    assert model.layers.q.get_value().sharding == q_sharding
    np.testing.assert_allclose(np.asarray(_logits(model, ids)), adapted, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_save_pretrained_exports_the_adapted_model(family, tmp_path):
    """An adapted model is exported with its adapters merged: reloading the checkpoint gives the adapted logits
    (before this, the base weights were written and the adapters silently dropped); the model keeps its adapters."""
    from maxmin_jax.models.hf import load_pretrained, save_pretrained

    model = build_model(CONFIGS[family], rngs=nnx.Rngs(0))
    add_lora(model, rank=4, alpha=8.0, targets="all", rngs=nnx.Rngs(1))
    _randomise_b(model)
    ids = _ids(seed=11)
    adapted = np.asarray(_logits(model, ids))
    assert np.abs(adapted - np.asarray(_logits(model, ids, use_lora=False))).max() > 1e-3
    save_pretrained(model, tmp_path / "export")
    assert set(lora_targets(model)) == set(LORA_SPECS[family])  # not merged in place
    reloaded = load_pretrained(tmp_path / "export")
    np.testing.assert_allclose(np.asarray(_logits(reloaded, ids)), adapted, atol=1e-5, rtol=1e-5)
