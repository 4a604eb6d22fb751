"""The accelerator paths, checked on CPU: fused self-attention against the hand-written einsum attention (left
padding, MHA / GQA / MQA, values and gradients), the cuDNN path's rotation to right padding (run through XLA's
kernel here), kernel selection and its fallback, the mixed-precision policy on tiny models, and the compiled model
call."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from maxmin_jax.models import GPT2Config, LlamaConfig, build_model
from maxmin_jax.models import attention as attention_module
from maxmin_jax.models.attention import _cudnn_left_padded, _splash, resolve_implementation, self_attention
from maxmin_jax.models.layers import attention as einsum_attention
from maxmin_jax.models.layers import float32_logits
from maxmin_jax.models.lora import add_lora, lora_filter
from maxmin_jax.models.transformer import _compiled_logits
from maxmin_jax.policy.ppo import token_logprobs
from maxmin_jax.sharding import make_mesh

B, T, H, D = 3, 12, 4, 8
PADS = np.array([5, 0, 11])  # leading pads per row; the last row has a single real token


def _qkv(kv: int, dtype=jnp.float32, seed: int = 0):
    kq, kk, kv_ = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(kq, (B, T, H, D), dtype), jax.random.normal(kk, (B, T, kv, D), dtype),
            jax.random.normal(kv_, (B, T, kv, D), dtype))


def _reference(q, k, v, valid):
    """The decoding path's einsum attention over the same keys laid out as a cache, causal by slot."""
    return einsum_attention(q, k.swapaxes(1, 2), v.swapaxes(1, 2), jnp.arange(T), valid)


VALID = jnp.asarray(np.arange(T)[None] >= PADS[:, None])
FUSED = {"xla": lambda q, k, v, valid: self_attention(q, k, v, valid, "xla"),
         "cudnn rotation (XLA kernel)": lambda q, k, v, valid: _cudnn_left_padded(q, k, v, valid, kernel="xla")}
SPLASH_T = 128  # splash's smallest block


@pytest.mark.parametrize("kv", [4, 2, 1], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("path", list(FUSED))
def test_fused_attention_equals_einsum_path_under_left_padding(path, kv):
    q, k, v = _qkv(kv)
    fused = FUSED[path]
    weights = jax.random.normal(jax.random.key(1), q.shape) * VALID[:, :, None, None]

    @jax.jit
    def value_and_grads(q, k, v):
        # The loss reads real rows only, as every loss in the library does; for the rotated path the gradient
        # goes through its custom gather / inverse-gather vjp.
        return [jax.value_and_grad(lambda q, k, v, f=f: jnp.sum(f(q, k, v, VALID) * weights), argnums=(0, 1, 2))(
            q, k, v) + (f(q, k, v, VALID),) for f in (fused, _reference)]

    (_, grads, out), (_, ref_grads, ref) = value_and_grads(q, k, v)
    real = np.asarray(VALID)
    out, ref = np.asarray(out), np.asarray(ref)
    assert np.isfinite(out).all()  # pad rows (no key to attend to) stay finite
    np.testing.assert_allclose(out[real], ref[real], rtol=1e-5, atol=1e-5)
    if path != "xla":
        assert not out[~real].any()  # the rotated path zeroes pad rows
    for got, want in zip(grads, ref_grads):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("path", list(FUSED))
def test_fused_attention_without_padding(path):
    q, k, v = _qkv(2, seed=3)
    everything = jnp.ones((B, T), bool)
    np.testing.assert_allclose(FUSED[path](q, k, v, None), _reference(q, k, v, everything), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("padded", [True, False], ids=["left-padded", "unpadded"])
def test_cudnn_path_traces_forward_and_backward(monkeypatch, padded):
    """The GPU-only path up to the kernel: with jax's cuDNN version and GPU checks answered as on an H100, the cuDNN
    call and its backward trace through every argument check of `jax.nn.dot_product_attention` (layout, dtypes,
    sequence lengths, GQA heads); only lowering needs a GPU."""
    import jax._src.cudnn.fused_attention_stablehlo as cudnn

    monkeypatch.setattr(cudnn, "check_cudnn_version", lambda: 91000)
    monkeypatch.setattr(cudnn, "check_compute_capability", lambda capability: True)
    monkeypatch.setattr(cudnn, "is_cuda_compute_capability_equal", lambda capability: False)
    q, k, v = _qkv(2, jnp.bfloat16)
    valid = VALID if padded else None
    loss = lambda q, k, v: jnp.sum(_cudnn_left_padded(q, k, v, valid).astype(jnp.float32))  # noqa: E731
    jaxpr = str(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v))
    assert "dot_product_attention_fwd" in jaxpr and "dot_product_attention_bwd" in jaxpr


def test_splash_kernel_equals_einsum_path(monkeypatch):
    """TPU splash attention, run by the Pallas interpreter on CPU: left padding through segment ids and GQA
    through the MQA kernel per key/value head give the einsum path's values, alone and under shard_map on a
    (data 2, fsdp 2, tensor 2) mesh of the eight CPU devices (batch and heads split). (Its backward is the
    kernel's own; checking it in the interpreter costs more than this suite can spend.)"""
    pads = np.array([5, 0, 127, 30])
    valid = jnp.asarray(np.arange(SPLASH_T)[None] >= pads[:, None])
    keys = jax.random.split(jax.random.key(5), 3)
    q = jax.random.normal(keys[0], (4, SPLASH_T, 4, 16))
    k, v = (jax.random.normal(key, (4, SPLASH_T, 2, 16)) for key in keys[1:])
    splash = lambda q, k, v: _splash(q, k, v, valid, None, interpret=True)  # noqa: E731
    reference = lambda q, k, v: einsum_attention(q, k.swapaxes(1, 2), v.swapaxes(1, 2),  # noqa: E731
                                                 jnp.arange(SPLASH_T), valid)
    real = np.asarray(valid)
    out, ref = np.asarray(jax.jit(splash)(q, k, v)), np.asarray(reference(q, k, v))
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out[real], ref[real], rtol=1e-5, atol=1e-5)

    mesh = make_mesh(2, 2, 2)
    sharded = jax.jit(lambda q, k, v: _splash(q, k, v, valid, mesh, interpret=True))(q, k, v)
    np.testing.assert_allclose(np.asarray(sharded)[real], ref[real], rtol=1e-5, atol=1e-5)


def test_fused_attention_in_bfloat16_within_tolerance():
    """bf16 inputs, float32 softmax inside both kernels: outputs agree to bf16 resolution (2^-8 relative)."""
    q, k, v = _qkv(2, jnp.bfloat16, seed=4)
    real = np.asarray(VALID)
    out = np.asarray(self_attention(q, k, v, VALID, "xla"), np.float32)
    ref = np.asarray(_reference(q, k, v, VALID), np.float32)
    assert np.abs(out[real] - ref[real]).max() < 3e-2


def test_kernel_selection_and_fallback(monkeypatch):
    q, k, _ = _qkv(2, jnp.bfloat16)
    assert resolve_implementation("auto", q, k) == "xla"  # CPU backend
    with pytest.raises(ValueError, match="cudnn attention cannot serve.*backend is cpu"):
        resolve_implementation("cudnn", q, k)
    with pytest.raises(ValueError, match="splash attention cannot serve.*backend is cpu"):
        resolve_implementation("splash", q, k)
    with pytest.raises(ValueError, match="one of"):
        resolve_implementation("flash", q, k)
    # Shapes that pass every trace-time check but fail to compile fall back to XLA with a warning, not a crash:
    # here the probe really compiles the cuDNN custom call, which the CPU backend cannot lower.
    # The probe runs while the model's step is being traced, as it does on a GPU.
    monkeypatch.setattr(attention_module, "cudnn_unsupported", lambda *args: None)
    attention_module._cudnn_probe.cache_clear()
    q, k, v = _qkv(2, jnp.bfloat16)
    with pytest.warns(RuntimeWarning, match="cuDNN flash attention failed to compile"):
        out = jax.jit(lambda q, k, v: self_attention(q, k, v, VALID, "auto"))(q, k, v)
    np.testing.assert_array_equal(out, self_attention(q, k, v, VALID, "xla"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # cached: the probe ran once for this shape
        assert resolve_implementation("auto", q, k) == "xla"
    attention_module._cudnn_probe.cache_clear()
    with pytest.raises(ValueError, match="attention_impl must be one of"):
        build_model(GPT2Config.tiny(), rngs=nnx.Rngs(0), attention_impl="flash")


# Mixed precision --------------------------------------------------------------------------------------------------
def test_bf16_compute_with_float32_parameters():
    config = LlamaConfig.tiny()
    ids = jax.random.randint(jax.random.key(0), (2, 10), 0, config.vocab_size)
    mixed = build_model(config, rngs=nnx.Rngs(0), dtype=jnp.bfloat16, param_dtype=jnp.float32)
    full = build_model(config, rngs=nnx.Rngs(0))
    assert {v.dtype for v in jax.tree.leaves(nnx.state(mixed, nnx.Param))} == {jnp.dtype(jnp.float32)}
    hidden = jax.eval_shape(lambda ids: mixed.hidden_states(ids), ids)  # traced, not compiled
    logits = mixed(ids)
    assert hidden.dtype == jnp.bfloat16 and logits.dtype == jnp.float32  # bf16 activations, float32 logits
    ref = np.asarray(full(ids))
    assert np.linalg.norm(np.asarray(logits) - ref) / np.linalg.norm(ref) < 2e-2  # bf16 tolerance


def test_logits_backward_runs_in_the_compute_dtype():
    """The float32-output logits matmul sends its gradient back through bf16 x bf16 dots, not f32 x bf16 ones."""
    h = jax.random.normal(jax.random.key(0), (2, 5, 16), jnp.bfloat16)
    w = jax.random.normal(jax.random.key(1), (64, 16), jnp.float32)
    loss = lambda h, w: jnp.sum(jnp.sin(float32_logits("btd,vd->btv", h, w)))  # noqa: E731
    dots = _dot_input_dtypes(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(h, w).jaxpr)
    assert dots == [("bfloat16", "bfloat16")] * 3  # forward (f32 output), then the two backward matmuls
    dh, dw = jax.grad(loss, argnums=(0, 1))(h, w)
    assert dh.dtype == jnp.bfloat16 and dw.dtype == jnp.float32  # each in its input's dtype
    ref_dh, ref_dw = jax.grad(lambda h, w: jnp.sum(jnp.sin(jnp.einsum("btd,vd->btv", h.astype(jnp.float32), w))),
                              argnums=(0, 1))(h, w)
    for got, want in ((dh, ref_dh), (dw, ref_dw)):
        got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
        assert np.linalg.norm(got - want) / np.linalg.norm(want) < 2e-2  # bf16 resolution


def _dot_input_dtypes(jaxpr) -> list[tuple[str, ...]]:
    """Input dtypes of every dot_general in a jaxpr, nested jaxprs (custom_vjp, pjit) included, in order."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            found.append(tuple(v.aval.dtype.name for v in eqn.invars))
        for param in eqn.params.values():
            inner = getattr(param, "jaxpr", param)
            if hasattr(inner, "eqns"):
                found += _dot_input_dtypes(inner)
    return found


def test_lora_adapters_train_in_float32_on_a_bf16_base():
    """Adapters and their optimiser state are float32 on a bf16 model, and keep updates bf16 would round away."""
    model = build_model(LlamaConfig.tiny(), rngs=nnx.Rngs(0), dtype=jnp.bfloat16)
    add_lora(model, rank=4, rngs=nnx.Rngs(1))
    assert model.layers.q.get_value().dtype == jnp.bfloat16
    adapters = nnx.state(model, lora_filter)
    assert {v.dtype for v in jax.tree.leaves(adapters)} == {jnp.dtype(jnp.float32)}
    optimizer = nnx.Optimizer(model, optax.adam(1e-4), wrt=lora_filter)
    ids = jax.random.randint(jax.random.key(2), (2, 9), 0, 128)

    @nnx.jit
    def step(model, optimizer):
        def loss_fn(model):
            return optax.softmax_cross_entropy_with_integer_labels(model(ids[:, :-1]), ids[:, 1:]).mean()

        grads = nnx.grad(loss_fn, argnums=nnx.DiffState(0, lora_filter))(model)
        optimizer.update(model, grads)
        return grads

    step(model, optimizer)  # B starts at 0, so A gets its first gradient on the second step
    before = model.layers.q_lora_a.get_value()
    grads = step(model, optimizer)
    assert {v.dtype for v in jax.tree.leaves(grads)} == {jnp.dtype(jnp.float32)}
    moments = [v for v in jax.tree.leaves(nnx.state(optimizer, nnx.OptState)) if v.ndim]
    assert moments and {v.dtype for v in moments} == {jnp.dtype(jnp.float32)}
    after = model.layers.q_lora_a.get_value()
    moved = np.asarray(after != before)
    assert moved.mean() > 0.5  # the step changed the float32 adapters ...
    lost = np.asarray(after.astype(jnp.bfloat16) == before.astype(jnp.bfloat16))
    assert lost[moved].mean() > 0.5  # ... by amounts most of which a bf16 copy would have rounded away


def test_model_call_runs_one_compiled_program_per_shape():
    model = build_model(GPT2Config.tiny(), rngs=nnx.Rngs(0))
    ids = np.ones((2, 7), np.int32)
    before = _compiled_logits._cache_size()
    first, second = model(ids), model(ids + 1)
    assert _compiled_logits._cache_size() == before + 1  # eager calls dispatch to one cached executable
    np.testing.assert_allclose(first, model.logits(model.hidden_states(jnp.asarray(ids))), rtol=1e-5, atol=1e-6)
    assert not np.allclose(first, second)


def test_token_logprobs_gradient_matches_log_softmax():
    """The hand-written backward of `token_logprobs` (no [B, T, V] log-softmax kept) is the log-softmax gradient."""
    logits = jax.random.normal(jax.random.key(0), (2, 5, 11)) * 3
    tokens = jax.random.randint(jax.random.key(1), (2, 5), 0, 11)
    weights = jax.random.normal(jax.random.key(2), (2, 5))

    def reference(z):
        return jnp.take_along_axis(jax.nn.log_softmax(z), tokens[..., None], axis=-1)[..., 0]

    np.testing.assert_allclose(token_logprobs(logits, tokens), reference(logits), rtol=1e-6, atol=1e-6)
    got = jax.grad(lambda z: jnp.sum(weights * token_logprobs(z, tokens)))(logits)
    want = jax.grad(lambda z: jnp.sum(weights * reference(z)))(logits)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
