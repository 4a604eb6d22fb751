"""transformers' PyTorch models holding exactly our weights, so both sides of a comparison compute one function."""

from __future__ import annotations

import os

import numpy as np

from maxmin_jax.models.hf import to_hf_tensors


def usable_cores() -> int:
    """Cores this process may run on: `os.cpu_count()` unless it is pinned (taskset), as XLA's CPU client sees."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def set_torch_threads() -> int:
    """Give PyTorch as many threads as XLA's CPU client uses (every usable core); returns the thread count."""
    import torch

    torch.set_num_threads(usable_cores())
    return torch.get_num_threads()


def hf_twin(model):
    """transformers' model for `model.config`, in eval mode, loaded with `model`'s parameters (strictly: the only
    key allowed to be absent is a tied LM head)."""
    import torch
    import transformers

    cfg = model.config
    hf_cfg = dict(cfg.to_hf())
    model_type = hf_cfg.pop("model_type")
    hf_cfg.pop("architectures", None)
    classes = {"gpt2": (transformers.GPT2Config, transformers.GPT2LMHeadModel),
               "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM)}
    config_cls, model_cls = classes[model_type]
    hf_config = config_cls(**hf_cfg)
    for name in ("bos_token_id", "eos_token_id"):  # GPT-2's default 50256 lies outside tiny test vocabularies
        value = getattr(hf_config, name, None)
        if isinstance(value, int) and value >= cfg.vocab_size:
            setattr(hf_config, name, None)
    hf = model_cls(hf_config)
    state = {k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in to_hf_tensors(model).items()}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    allowed_missing = {"lm_head.weight"} if cfg.tie_word_embeddings else set()
    if set(missing) - allowed_missing or unexpected:
        raise RuntimeError(f"HF twin of {model_type}: missing {missing}, unexpected {unexpected}")
    return hf.eval()
