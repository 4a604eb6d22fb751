"""Generation: token-for-token agreement with HF generate, reproducible sampling, EOS handling, log-probs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from maxmin_jax import generate, load_pretrained
from maxmin_jax.generate import _generate_jit
from test_models import left_padded_batch


@pytest.fixture(scope="module")
def gpt2(tiny_gpt2_dir):
    return load_pretrained(tiny_gpt2_dir)


@pytest.mark.parametrize("which", ["gpt2", "gqa", "mqa"])
def test_greedy_matches_hf_generate_on_left_padded_batch(tiny_gpt2_dir, tiny_llama_dirs, which):
    directory = tiny_gpt2_dir if which == "gpt2" else tiny_llama_dirs[which]
    ids, mask = left_padded_batch()
    hf = AutoModelForCausalLM.from_pretrained(directory).eval()
    with torch.no_grad():
        ref = hf.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), do_sample=False, max_new_tokens=12,
                          pad_token_id=0, eos_token_id=None).numpy()
    out = generate(load_pretrained(directory), ids, mask, max_new_tokens=12, rng=jax.random.key(0), temperature=0)
    np.testing.assert_array_equal(np.asarray(out), ref)


def test_sampling_is_reproducible_and_key_dependent(gpt2):
    ids, mask = left_padded_batch()
    kwargs = dict(max_new_tokens=10, temperature=1.0, top_k=20, top_p=0.9)
    a = generate(gpt2, ids, mask, rng=jax.random.key(3), **kwargs)
    b = generate(gpt2, ids, mask, rng=jax.random.key(3), **kwargs)
    c = generate(gpt2, ids, mask, rng=jax.random.key(4), **kwargs)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    np.testing.assert_array_equal(a[:, :ids.shape[1]], ids)


def test_top_k_one_is_greedy(gpt2):
    ids, mask = left_padded_batch()
    greedy = generate(gpt2, ids, mask, max_new_tokens=8, rng=jax.random.key(0), temperature=0)
    top1 = generate(gpt2, ids, mask, max_new_tokens=8, rng=jax.random.key(9), temperature=0.7, top_k=1)
    np.testing.assert_array_equal(greedy, top1)


def test_eos_pads_the_rest_of_the_row(gpt2):
    ids, mask = left_padded_batch()
    t = ids.shape[1]
    free = np.asarray(generate(gpt2, ids, mask, max_new_tokens=10, rng=jax.random.key(1)))
    eos = int(free[0, t + 2])  # row 0 produces this token at step 2 when sampling with this key
    out, logprobs = generate(gpt2, ids, mask, max_new_tokens=10, rng=jax.random.key(1), eos_token_id=[eos, 99],
                             pad_token_id=0, return_logprobs=True)
    out, logprobs = np.asarray(out), np.asarray(logprobs)
    for row in range(out.shape[0]):
        new = out[row, t:]
        hits = np.flatnonzero(np.isin(new, [eos, 99]))
        if hits.size:
            np.testing.assert_array_equal(new[hits[0] + 1:], 0)
            np.testing.assert_array_equal(logprobs[row, hits[0] + 1:], 0.0)
    assert np.isin(out[0, t:t + 3], [eos, 99]).any()


def test_logprobs_match_teacher_forced_model(gpt2):
    ids, mask = left_padded_batch()
    t = ids.shape[1]
    out, logprobs = generate(gpt2, ids, mask, max_new_tokens=6, rng=jax.random.key(2), return_logprobs=True)
    full_mask = np.concatenate([mask, np.ones((ids.shape[0], 6), np.int64)], axis=1)
    logits = gpt2(jnp.asarray(out), jnp.asarray(full_mask))
    expected = jnp.take_along_axis(jax.nn.log_softmax(logits[:, t - 1:-1]), out[:, t:, None], axis=-1)[..., 0]
    np.testing.assert_allclose(logprobs, expected, atol=1e-4)


def test_prompt_lengths_share_a_bucket_and_compile_once(gpt2):
    before = _generate_jit._cache_size()
    for length in (5, 7, 11):
        ids, mask = left_padded_batch(length=length)
        generate(gpt2, ids, mask, max_new_tokens=4, rng=jax.random.key(0), temperature=0)
    assert _generate_jit._cache_size() - before <= 1


def test_bad_arguments_are_refused(gpt2):
    ids, mask = left_padded_batch()
    with pytest.raises(ValueError, match="max_position_embeddings"):
        generate(gpt2, ids, mask, max_new_tokens=100, rng=jax.random.key(0))
    with pytest.raises(ValueError, match="top_k"):
        generate(gpt2, ids, mask, max_new_tokens=4, rng=jax.random.key(0), top_k=0)


@pytest.mark.parametrize("top_k, top_p", [(5, None), (None, 0.9), (None, 0.3), (20, 0.8), (1, 0.5), (None, 1.0)])
def test_top_k_top_p_keep_the_tokens_transformers_keeps(top_k, top_p):
    """The same kept set as transformers' TopKLogitsWarper then TopPLogitsWarper, row by row."""
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    from maxmin_jax.generate import filter_logits

    logits = np.random.default_rng(top_k or 0).normal(size=(16, 50)).astype(np.float32) * 3
    scores = torch.tensor(logits)
    if top_k is not None:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p is not None:
        scores = TopPLogitsWarper(top_p)(None, scores)
    ours = np.asarray(filter_logits(jnp.asarray(logits), top_k, None if top_p is None else jnp.float32(top_p)))
    np.testing.assert_array_equal(ours > np.finfo(np.float32).min, np.isfinite(scores.numpy()))


def test_top_p_and_top_k_outside_their_range_are_refused(gpt2):
    """top_p <= 0 used to mask every token and sample uniformly; top_k < 1 has no meaning."""
    ids, mask = left_padded_batch()
    for bad in (dict(top_p=0.0), dict(top_p=-0.1), dict(top_p=1.2), dict(top_k=0), dict(top_k=-3),
                dict(top_k=gpt2.config.vocab_size + 1)):
        with pytest.raises(ValueError, match=r"top_[kp]: expected"):
            generate(gpt2, ids, mask, max_new_tokens=4, rng=jax.random.key(0), **bad)
