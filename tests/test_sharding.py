"""Sharded runs agree with single-device runs, and the weights are really split.

On meshes (data, fsdp, tensor) = (8,1,1), (2,4,1), (2,2,2) of eight fake CPU devices: a reward-model BT step, one
EM round, greedy and seeded sampling, two PPO iterations and `load_pretrained(mesh=...)` give the numbers of the
same computation on one device (float32 rounding apart), while the embedding, MLP and attention kernels hold only
their shard on each device, and hidden states stay split over the batch. Divisibility and mesh-size mistakes are
refused up front, naming the axis, the size and the mesh dimension. The memory planner's per-device bytes shrink
with FSDP and count LoRA adapters as the only trainable weights.
"""

import ast
import functools
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from maxmin_jax.data.batching import PairBatch
from maxmin_jax.generate import SamplingConfig, generate
from maxmin_jax.memory_plan import memory_plan
from maxmin_jax.models import GPT2Config, build_model
from maxmin_jax.models.hf import load_pretrained
from maxmin_jax.policy.model import PolicyWithValue
from maxmin_jax.policy.objectives import RewardStandardizer, make_objective
from maxmin_jax.policy.ppo import PPOConfig
from maxmin_jax.policy.trainer import PPOTrainer, _iteration
from maxmin_jax.rewards.bt import bt_loss
from maxmin_jax.rewards.em import EMConfig, MStepConfig, fit_em
from maxmin_jax.rewards.model import RewardModel, score_pairs
from maxmin_jax.partitioning import constrain, logical_to_spec
from maxmin_jax.sharding import ShardingError, make_mesh, shard_batch, shard_module, state_shardings

MESHES = [(8, 1, 1), (2, 4, 1), (2, 2, 2)]
CONFIG = GPT2Config.tiny(vocab_size=128)  # hidden 32, 4 heads, MLP 128: divisible by every mesh above
TOL = dict(rtol=1e-5, atol=1e-5)
TRAIN_TOL = dict(rtol=1e-4, atol=1e-4)  # several optimiser steps


@pytest.fixture(scope="module", params=MESHES, ids=lambda s: "x".join(map(str, s)))
def mesh(request):
    assert jax.device_count() == 8, "tests/conftest.py asks XLA for eight CPU devices"
    return make_mesh(*request.param)


# Helpers ------------------------------------------------------------------------------------------------------------
def left_padded(rng: np.random.Generator, n: int, t: int, min_len: int = 3) -> tuple[np.ndarray, np.ndarray]:
    lengths = rng.integers(min_len, t + 1, n)
    mask = (np.arange(t)[None] >= t - lengths[:, None]).astype(np.int32)
    return (rng.integers(1, CONFIG.vocab_size, (n, t)) * mask).astype(np.int32), mask


def random_pairs(n: int = 16, t: int = 12, users: int = 4, seed: int = 0) -> PairBatch:
    rng = np.random.default_rng(seed)
    (ci, cm), (ri, rm) = left_padded(rng, n, t), left_padded(rng, n, t)
    return PairBatch(ci, cm, ri, rm, user_index=(np.arange(n) % users).astype(np.int32),
                     user_ids=tuple(f"user{u}" for u in range(users)))


def expected_shard_shape(shape, divisors) -> tuple[int, ...]:
    return tuple(s // d for s, d in zip(shape, divisors, strict=True))


def assert_split(x: jax.Array, mesh, axes: tuple[str | None, ...]):
    """Each device holds exactly the block the mesh axes named per dimension give, and no more."""
    divisors = [mesh.shape[a] if a else 1 for a in axes]
    want = expected_shard_shape(x.shape, divisors)
    assert len(x.sharding.device_set) == mesh.size
    assert {s.data.shape for s in x.addressable_shards} == {want}, (x.shape, x.sharding, want)
    if math.prod(divisors) > 1:
        assert math.prod(want) < math.prod(x.shape)


def assert_gpt2_split(lm, mesh):
    """GPT-2's block kernels: embed over fsdp, heads and MLP over tensor; the layer axis is never split."""
    layers = lm.layers
    assert_split(layers.qkv[...], mesh, (None, "fsdp", None, "tensor", None))  # [L, D, 3, H, Dh]
    assert_split(layers.attn_out[...], mesh, (None, "tensor", None, "fsdp"))  # [L, H, Dh, D]
    assert_split(layers.fc[...], mesh, (None, "fsdp", "tensor"))  # [L, D, F]
    assert_split(layers.proj[...], mesh, (None, "tensor", "fsdp"))  # [L, F, D]
    assert_split(lm.wte[...], mesh, ("tensor", "fsdp"))  # [V, D]


def assert_trees_close(a, b, **tol):
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b)
    for x, y in zip(leaves_a, leaves_b, strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), **tol)


def reward_model(seed: int = 0) -> RewardModel:
    return RewardModel.from_config(CONFIG, 2, nnx.Rngs(seed))


# (a) Reward-model BT step -----------------------------------------------------------------------------------------
REWARD_TX = optax.adam(1e-2)
# BT alone is blind to reward offsets, so the gradient of every bias feeding the rewards equally is zero up to
# rounding, and Adam blows that noise up to +-learning_rate (differently per sharding). Centring the rewards gives
# those biases a real gradient.
CENTER = 0.1
PAIR_FIELDS = ("chosen_ids", "chosen_mask", "rejected_ids", "rejected_mask", "user_index")


@functools.partial(jax.jit, static_argnames="graphdef", donate_argnums=(1, 2))
def bt_step(graphdef, params, opt_state, rest, batch: dict):
    weights = jax.nn.one_hot(batch["user_index"] % 2, 2)  # each pair counts for one head

    def loss_fn(p):
        rc, rr = score_pairs(nnx.merge(graphdef, p, rest), batch["chosen_ids"], batch["chosen_mask"],
                             batch["rejected_ids"], batch["rejected_mask"])
        return bt_loss(rc, rr, weights, center_coef=CENTER)

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = REWARD_TX.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, grads


def run_bt(mesh, steps: int = 2):
    model = reward_model()
    pairs = random_pairs()
    data = {f: jnp.asarray(getattr(pairs, f)) for f in PAIR_FIELDS}
    if mesh is not None:
        shard_module(model, mesh)
        data = shard_batch(data, mesh)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    opt_state = REWARD_TX.init(params)
    losses, grads = [], None
    for _ in range(steps):
        params, opt_state, loss, g = bt_step(graphdef, params, opt_state, rest, data)
        losses.append(float(loss))
        grads = grads if grads is not None else g
    return nnx.merge(graphdef, params, rest), losses, grads


@pytest.fixture(scope="module")
def bt_single():
    return run_bt(None)


def test_reward_bt_step_matches_single_device(mesh, bt_single):
    model, losses, grads = run_bt(mesh)
    ref_model, ref_losses, ref_grads = bt_single
    np.testing.assert_allclose(losses, ref_losses, **TOL)
    assert_trees_close(grads, ref_grads, **TOL)
    assert_trees_close(nnx.state(model, nnx.Param), nnx.state(ref_model, nnx.Param), **TRAIN_TOL)
    assert_gpt2_split(model.backbone, mesh)  # the updated weights keep their sharding


# (b) One EM round --------------------------------------------------------------------------------------------------
EM = EMConfig(num_groups=2, rounds=1, steps_per_round=3, batch_size=8, chunk_size=8, progress=False,
              m_step=MStepConfig(learning_rate=1e-2, center_coef=CENTER))


def run_em(mesh):
    return fit_em(reward_model(), random_pairs(), EM, mesh=mesh)  # places the model on the mesh itself


@pytest.fixture(scope="module")
def em_single():
    return run_em(None)


def test_em_round_matches_single_device(mesh, em_single):
    result, ref = run_em(mesh), em_single
    (h,), (ref_h,) = result.history, ref.history  # E-step scores (log-likelihoods) after the M-step
    for key in ("log_likelihood", "classification_log_likelihood", "m_step_loss", "m_step_accuracy"):
        np.testing.assert_allclose(h[key], ref_h[key], **TRAIN_TOL, err_msg=key)
    assert h["m_step_accepted"] == ref_h["m_step_accepted"]
    np.testing.assert_array_equal(result.assignments, ref.assignments)
    np.testing.assert_allclose(result.responsibilities, ref.responsibilities, **TRAIN_TOL)
    assert_trees_close(nnx.state(result.model, nnx.Param), nnx.state(ref.model, nnx.Param), **TRAIN_TOL)
    assert_gpt2_split(result.model.backbone, mesh)


# (c) Sampling ------------------------------------------------------------------------------------------------------
SAMPLING = {"greedy": dict(temperature=0.0), "seeded": dict(temperature=1.0, top_k=20, top_p=0.9)}


def run_generate(mesh):
    model = build_model(CONFIG, rngs=nnx.Rngs(0))
    ids, mask = left_padded(np.random.default_rng(1), 8, 8)
    if mesh is not None:
        shard_module(model, mesh)
        ids, mask = shard_batch((ids, mask), mesh)
    out = {name: generate(model, ids, mask, max_new_tokens=8, rng=jax.random.key(7), return_logprobs=True, **kw)
           for name, kw in SAMPLING.items()}
    return model, jax.tree.map(np.asarray, out)


@pytest.fixture(scope="module")
def generate_single():
    return run_generate(None)[1]


def test_generate_matches_single_device(mesh, generate_single):
    model, out = run_generate(mesh)
    assert_gpt2_split(model, mesh)
    for name in SAMPLING:
        (tokens, logprobs), (ref_tokens, ref_logprobs) = out[name], generate_single[name]
        np.testing.assert_array_equal(tokens, ref_tokens, err_msg=name)
        np.testing.assert_allclose(logprobs, ref_logprobs, **TOL, err_msg=name)
    assert not np.array_equal(out["greedy"][0], out["seeded"][0])


# (d) PPO iterations -------------------------------------------------------------------------------------------------
def run_ppo(mesh, iterations: int = 2):
    policy = PolicyWithValue(build_model(CONFIG, rngs=nnx.Rngs(0)))
    reference = build_model(CONFIG, rngs=nnx.Rngs(0))
    reward = reward_model(seed=1)
    prompts, prompt_mask = left_padded(np.random.default_rng(2), 16, 8)
    if mesh is not None:
        for module in (policy, reference, reward):
            shard_module(module, mesh)
        prompts, prompt_mask = shard_batch((prompts, prompt_mask), mesh)
    trainer = PPOTrainer(policy, reward, make_objective("maxmin"), RewardStandardizer.identity(2),
                         reference=reference, ppo=PPOConfig(learning_rate=1e-3, minibatches=2, epochs=1),
                         sampling=SamplingConfig(max_new_tokens=8))
    state, metrics = trainer.init_state(), []
    for it in range(iterations):
        state, m = trainer.step(state, prompts, prompt_mask, jax.random.key(it))
        metrics.append(jax.tree.map(np.asarray, m))
        compiled = _iteration._cache_size() if it == 0 else compiled
    # The state the iteration returns has the shardings it started with, spelled alike: no second compile.
    assert _iteration._cache_size() == compiled
    return trainer.policy(state), metrics


@pytest.fixture(scope="module")
def ppo_single():
    return run_ppo(None)


def test_ppo_iteration_matches_single_device(mesh, ppo_single):
    policy, metrics = run_ppo(mesh)
    ref_policy, ref_metrics = ppo_single
    for m, ref in zip(metrics, ref_metrics, strict=True):
        assert m.keys() == ref.keys()
        for key in m:
            # Clip fractions count tokens on either side of a threshold, and vf_clipfrac compares two errors that
            # are equal up to rounding wherever the value is not clipped: a few of the 128 tokens may flip.
            tol = dict(rtol=0, atol=4 / 128) if key.endswith("clipfrac") else TRAIN_TOL
            np.testing.assert_allclose(m[key], ref[key], **tol, err_msg=key)
    assert_trees_close(nnx.state(policy, nnx.Param), nnx.state(ref_policy, nnx.Param), **TRAIN_TOL)
    assert_gpt2_split(policy.lm, mesh)  # donated state comes back in its sharding, iteration after iteration


# Loading straight into shardings ------------------------------------------------------------------------------------
def test_load_pretrained_places_shards_and_keeps_logits(mesh, tiny_gpt2_dir):
    ids, mask = left_padded(np.random.default_rng(3), 8, 10)
    ids = ids % 100  # the saved checkpoint's vocabulary
    single = load_pretrained(tiny_gpt2_dir)
    sharded = load_pretrained(tiny_gpt2_dir, mesh=mesh)
    assert_gpt2_split(sharded, mesh)
    forward = nnx.jit(lambda model, ids, mask: model(ids, mask))
    ref = forward(single, ids, mask)
    got = forward(sharded, *shard_batch((ids, mask), mesh))
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), **TOL)


def test_sharded_lm_keeps_hidden_states_split_over_the_batch(tiny_gpt2_dir):
    """FSDP splits the weights' embedding axis over the mesh axis that also splits the batch; the model pins its
    activations to the batch split (else XLA may split them along the embedding and hold the whole batch)."""
    mesh = make_mesh(1, 8, 1)
    policy = shard_module(PolicyWithValue(build_model(CONFIG, rngs=nnx.Rngs(0))), mesh)
    loaded = load_pretrained(tiny_gpt2_dir, mesh=mesh)
    assert policy.lm.mesh == mesh and loaded.mesh == mesh  # recorded on the weights by the placement
    assert build_model(CONFIG, rngs=nnx.Rngs(0)).mesh is None
    ids = shard_batch(np.ones((8, 8), np.int32), mesh)
    hidden = nnx.jit(lambda lm, ids: lm.hidden_states(ids))(policy.lm, ids)
    assert {s.data.shape for s in hidden.addressable_shards} == {(1, 8, CONFIG.hidden_size)}


# Mistakes refused up front ------------------------------------------------------------------------------------------
def test_indivisible_hidden_size_is_refused_naming_axis_size_and_mesh():
    config = GPT2Config(vocab_size=128, max_position_embeddings=16, hidden_size=36, num_layers=1, num_heads=4)
    mesh = make_mesh(1, 8, 1)
    abstract = nnx.eval_shape(lambda: build_model(config, rngs=nnx.Rngs(0)))
    with pytest.raises(ShardingError, match=r"'embed' has size 36.*\('fsdp',\).*8") as err:
        state_shardings(nnx.state(abstract), mesh)  # planned from shapes alone: nothing allocated
    assert "'fsdp': 8" in str(err.value)


def test_load_pretrained_refuses_indivisible_heads_before_placing(tiny_gpt2_dir):
    with pytest.raises(ShardingError, match=r"'heads' has size 4.*\('tensor',\).*8"):
        load_pretrained(tiny_gpt2_dir, mesh=make_mesh(1, 1, 8))


def test_indivisible_batch_is_refused():
    with pytest.raises(ShardingError, match=r"batch size 6 is not divisible by data x fsdp = 8"):
        shard_batch(np.zeros((6, 4), np.int32), make_mesh(2, 4, 1))


@pytest.mark.parametrize("shape", [(2, 2, 1), (4, 4, 1), (1, 1, 3)])
def test_make_mesh_refuses_a_product_other_than_the_device_count(shape):
    with pytest.raises(ShardingError, match=rf"= {math.prod(shape)} devices, but 8 are available"):
        make_mesh(*shape)


def test_unknown_logical_axis_is_refused_not_replicated():
    mesh = make_mesh(2, 2, 2)
    with pytest.raises(ShardingError, match=r"w: unknown logical axis 'embedding'.*LOGICAL_RULES"):
        logical_to_spec(("layers", "embedding"), (2, 32), mesh, name="w")
    with pytest.raises(ShardingError, match="unknown logical axis 'seq'"):
        jax.jit(lambda x: constrain(x, mesh, ("batch", "seq")))(jnp.ones((8, 4)))


def test_rules_and_placement_modules_import_no_model():
    """The logical-axis rules, the constraint helper and placement sit below the models: neither module imports
    model code anywhere (not even inside a function), so the models import them without a cycle."""
    import maxmin_jax.partitioning as partitioning
    import maxmin_jax.sharding as sharding

    for module in (partitioning, sharding):
        tree = ast.parse(Path(module.__file__).read_text())
        imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        # errors.py imports nothing of the library
        allowed = {"maxmin_jax.partitioning", "maxmin_jax.errors"}
        assert {m for m in imported if m and m.startswith("maxmin_jax")} <= allowed, module


def test_unsharded_axes_stay_replicated():
    """Layer norms are replicated; a bias is split only along its MLP axis, like its kernel."""
    mesh = make_mesh(2, 2, 2)
    model = shard_module(build_model(CONFIG, rngs=nnx.Rngs(0)), mesh)
    assert_split(model.layers.ln_1_scale[...], mesh, (None, None))
    assert_split(model.layers.fc_bias[...], mesh, (None, "tensor"))


# Memory plan ----------------------------------------------------------------------------------------------------------
def test_memory_plan_per_device_bytes_shrink_with_fsdp():
    one = memory_plan("gpt2-tiny", (1, 1, 1), steps=("decode",))
    fsdp = memory_plan("gpt2-tiny", (1, 8, 1), steps=("decode",))
    total = sum(math.prod(v.shape) * 4 for v in jax.tree.leaves(
        nnx.state(nnx.eval_shape(lambda: PolicyWithValue(build_model(CONFIG, rngs=nnx.Rngs(0)))))))
    assert one["state"]["policy_bytes"] == total  # one device holds everything
    for key in ("policy_bytes", "optimizer_bytes", "reward_bytes"):
        assert fsdp["state"][key] < one["state"][key] / 4, key
    # The compiled decode step's arguments (weights + KV cache) shrink too.
    assert fsdp["decode"]["method"] == "compiled"
    assert fsdp["decode"]["argument"] < one["decode"]["argument"] / 4
    assert one["decode"]["total"] >= one["decode"]["argument"]


def test_memory_plan_counts_lora_adapters_as_the_only_trainable_weights():
    plan = memory_plan("llama-tiny-lora", (1, 8, 1), steps=())  # shapes and shardings only: nothing compiled
    L, D, r, H, KV, Dh = 2, 32, 4, 4, 2, 8  # LlamaConfig.tiny(), policy rank 4 on q and v
    adapters = L * (D * r + r * H * Dh) + L * (D * r + r * KV * Dh)
    assert plan["state"]["trainable_params"] == adapters + D + 1  # + the value head
    assert plan["state"]["reference_bytes"] == 0  # the reference is the base weights with adapters off
