"""Strict Hugging Face checkpoint <-> Flax mapping: `load_pretrained` and `save_pretrained`.

Every parameter of the module names the checkpoint key(s) it comes from and the exact reshape/transpose; loading
fails, listing the keys, if a key is missing, left unused, or has the wrong shape. The module is built abstractly
(`nnx.eval_shape`) and each tensor is read (memory-mapped), converted and placed straight into its sharding, so a
7B model is never materialised twice.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from maxmin_jax.errors import InputError
from maxmin_jax.models import build_model
from maxmin_jax.models.config import GPT2Config, LlamaConfig, ModelConfig, config_from_hf
from maxmin_jax.models.transformer import CausalLM


class CheckpointError(InputError, ValueError):
    """A checkpoint does not match the model it is loaded into."""


@dataclasses.dataclass(frozen=True)
class Rule:
    """One module parameter <- one HF tensor per layer (`{i}` in the key) or a single tensor."""

    ours: str  # flat path in the module state, e.g. "layers/qkv"
    hf: str  # checkpoint key, with {i} for the layer index
    to_ours: Callable[[np.ndarray], np.ndarray]  # HF layout -> ours (one layer)
    to_hf: Callable[[np.ndarray], np.ndarray]  # ours -> HF layout (one layer)


def _same(x):
    return x


def _transpose(x):
    return x.T


def _reshape(shape):
    return lambda x: x.reshape(shape)


def _gpt2_rules(c: GPT2Config, prefix: str) -> list[Rule]:
    D, H, Dh = c.hidden_size, c.num_heads, c.head_dim
    h = prefix + "h.{i}."
    # GPT-2 uses Conv1D, whose weight is stored [in, out], already our layout: no transposes, only head splits.
    return [
        Rule("wte", prefix + "wte.weight", _same, _same),
        Rule("wpe", prefix + "wpe.weight", _same, _same),
        Rule("layers/ln_1_scale", h + "ln_1.weight", _same, _same),
        Rule("layers/ln_1_bias", h + "ln_1.bias", _same, _same),
        Rule("layers/qkv", h + "attn.c_attn.weight", _reshape((D, 3, H, Dh)), _reshape((D, 3 * H * Dh))),
        Rule("layers/qkv_bias", h + "attn.c_attn.bias", _reshape((3, H, Dh)), _reshape((3 * H * Dh,))),
        Rule("layers/attn_out", h + "attn.c_proj.weight", _reshape((H, Dh, D)), _reshape((H * Dh, D))),
        Rule("layers/attn_out_bias", h + "attn.c_proj.bias", _same, _same),
        Rule("layers/ln_2_scale", h + "ln_2.weight", _same, _same),
        Rule("layers/ln_2_bias", h + "ln_2.bias", _same, _same),
        Rule("layers/fc", h + "mlp.c_fc.weight", _same, _same),
        Rule("layers/fc_bias", h + "mlp.c_fc.bias", _same, _same),
        Rule("layers/proj", h + "mlp.c_proj.weight", _same, _same),
        Rule("layers/proj_bias", h + "mlp.c_proj.bias", _same, _same),
        Rule("ln_f_scale", prefix + "ln_f.weight", _same, _same),
        Rule("ln_f_bias", prefix + "ln_f.bias", _same, _same),
    ]


def _llama_rules(c: LlamaConfig) -> list[Rule]:
    D, H, KV, Dh = c.hidden_size, c.num_heads, c.num_kv_heads, c.dim_per_head
    a, m = "model.layers.{i}.self_attn.", "model.layers.{i}.mlp."
    # torch.nn.Linear stores [out, in]; we keep [in, out] (heads split out), so every projection is transposed.
    rules = [
        Rule("embed", "model.embed_tokens.weight", _same, _same),
        Rule("layers/attn_norm", "model.layers.{i}.input_layernorm.weight", _same, _same),
        Rule("layers/q", a + "q_proj.weight", lambda w: w.T.reshape(D, H, Dh), lambda w: w.reshape(D, H * Dh).T),
        Rule("layers/k", a + "k_proj.weight", lambda w: w.T.reshape(D, KV, Dh), lambda w: w.reshape(D, KV * Dh).T),
        Rule("layers/v", a + "v_proj.weight", lambda w: w.T.reshape(D, KV, Dh), lambda w: w.reshape(D, KV * Dh).T),
        Rule("layers/o", a + "o_proj.weight", lambda w: w.T.reshape(H, Dh, D), lambda w: w.reshape(H * Dh, D).T),
        Rule("layers/mlp_norm", "model.layers.{i}.post_attention_layernorm.weight", _same, _same),
        Rule("layers/gate", m + "gate_proj.weight", _transpose, _transpose),
        Rule("layers/up", m + "up_proj.weight", _transpose, _transpose),
        Rule("layers/down", m + "down_proj.weight", _transpose, _transpose),
        Rule("norm", "model.norm.weight", _same, _same),
    ]
    if not c.tie_word_embeddings:
        rules.append(Rule("lm_head", "lm_head.weight", _transpose, _transpose))
    return rules


# Checkpoint entries that are buffers, not parameters (old GPT-2 attention masks, cached RoPE frequencies).
_BUFFER_PATTERNS = [re.compile(p) for p in (r".*attn\.(masked_)?bias$", r".*rotary_emb\.inv_freq$")]
# A tied head is sometimes saved as a duplicate of the embedding; it is checked equal, then not loaded twice.
_TIED_HEAD_KEY = "lm_head.weight"


def rules_for(config: ModelConfig, checkpoint_keys: set[str] | None = None) -> list[Rule]:
    if isinstance(config, GPT2Config):
        # Hub GPT-2 files name keys "h.0...."; transformers' save_pretrained writes "transformer.h.0....".
        bare = checkpoint_keys is not None and "wte.weight" in checkpoint_keys
        return _gpt2_rules(config, "" if bare else "transformer.")
    return _llama_rules(config)


# Reading checkpoints --------------------------------------------------------------------------------------------
_SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
                       "I64": np.int64, "I32": np.int32, "U8": np.uint8, "BOOL": np.bool_}


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Memory-mapped views of every tensor in a .safetensors file (bfloat16 included, via ml_dtypes)."""
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(header_len))
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + header_len)
    out = {}
    for key, meta in header.items():
        if key == "__metadata__":
            continue
        if meta["dtype"] not in _SAFETENSORS_DTYPES:
            raise CheckpointError(f"{path}: tensor {key} has dtype {meta['dtype']}, which this loader cannot read")
        start, end = meta["data_offsets"]
        out[key] = data[start:end].view(_SAFETENSORS_DTYPES[meta["dtype"]]).reshape(meta["shape"])
    return out


def _read_torch_bin(path: Path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError as e:  # torch is only needed for legacy .bin checkpoints
        raise CheckpointError(f"{path} is a PyTorch pickle; install torch to read it, or convert to safetensors") from e
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    out = {}
    for key, t in state.items():
        if t.dtype == torch.bfloat16:
            out[key] = t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        else:
            out[key] = t.numpy()
    return out


def read_checkpoint(directory: str | os.PathLike) -> dict[str, np.ndarray]:
    """All tensors of a checkpoint directory: model.safetensors, a sharded index, or pytorch_model.bin."""
    directory = Path(directory)
    files: list[Path]
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (directory / index_name).exists():
            weight_map = json.loads((directory / index_name).read_text())["weight_map"]
            files = sorted({directory / f for f in weight_map.values()})
            break
    else:
        files = [p for p in (directory / "model.safetensors", directory / "pytorch_model.bin") if p.exists()][:1]
    if not files:
        raise CheckpointError(f"{directory}: no model.safetensors, pytorch_model.bin or sharded index found")
    tensors: dict[str, np.ndarray] = {}
    for f in files:
        tensors.update(_read_safetensors(f) if f.suffix == ".safetensors" else _read_torch_bin(f))
    return tensors


def resolve_checkpoint_dir(name_or_path: str | os.PathLike) -> Path:
    """A local directory as is; anything else is a hub id, downloaded (config and weights only) to the HF cache."""
    path = Path(name_or_path)
    if path.is_dir():
        return path
    if path.exists() or str(name_or_path).startswith((".", "/")):
        raise CheckpointError(f"{name_or_path}: not a checkpoint directory")
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(str(name_or_path), allow_patterns=[
        "config.json", "*.safetensors", "model.safetensors.index.json", "pytorch_model*.bin",
        "pytorch_model.bin.index.json"]))


# Loading --------------------------------------------------------------------------------------------------------
def _layer_keys(rule: Rule, num_layers: int) -> list[str]:
    return [rule.hf.format(i=i) for i in range(num_layers)] if "{i}" in rule.hf else [rule.hf]


def load_pretrained(name_or_path: str | os.PathLike, *, dtype=jnp.float32, mesh: jax.sharding.Mesh | None = None,
                    **model_kwargs) -> CausalLM:
    """Load a Hugging Face GPT-2 or Llama checkpoint (local directory or hub id) into a Flax NNX causal LM.

    Strict: refuses unknown model types, unimplemented config features, missing or unused checkpoint keys and
    shape mismatches, listing the keys. With `mesh`, each tensor goes straight into its sharding.
    """
    directory = resolve_checkpoint_dir(name_or_path)
    config_path = directory / "config.json"
    if not config_path.exists():
        raise CheckpointError(f"{directory}: no config.json")
    config = config_from_hf(json.loads(config_path.read_text()), source=str(config_path))
    return convert_hf_tensors(config, read_checkpoint(directory), dtype=dtype, mesh=mesh, source=str(directory),
                              **model_kwargs)


def convert_hf_tensors(config: ModelConfig, tensors: dict[str, np.ndarray], *, dtype=jnp.float32, mesh=None,
                       source: str = "checkpoint", **model_kwargs) -> CausalLM:
    """Build the module abstractly and fill every parameter from `tensors` (HF names), strictly."""
    from maxmin_jax.sharding import variable_sharding

    abstract = nnx.eval_shape(lambda: build_model(config, rngs=nnx.Rngs(0), dtype=dtype, **model_kwargs))
    graphdef, abstract_state = nnx.split(abstract)
    rules = {r.ours: r for r in rules_for(config, set(tensors))}
    used: set[str] = set()
    missing, mismatched, placed = [], [], []
    for path, var in nnx.to_flat_state(abstract_state):
        name = "/".join(map(str, path))
        rule = rules.pop(name, None)
        if rule is None:
            raise CheckpointError(f"internal: no checkpoint rule for parameter {name}")
        keys = _layer_keys(rule, config.num_layers)
        absent = [k for k in keys if k not in tensors]
        if absent:
            missing.extend(absent)
            continue
        layers = [rule.to_ours(np.asarray(tensors[k])) for k in keys]
        expected = var.get_value().shape
        value = np.stack(layers) if "{i}" in rule.hf else layers[0]
        if value.shape != expected:
            mismatched.append(f"{rule.hf.format(i='*')}: checkpoint gives {value.shape} for {name}, "
                              f"model expects {expected}")
            continue
        used.update(keys)
        value = value.astype(var.get_value().dtype)
        sharding = variable_sharding(var, mesh, name=name) if mesh is not None else None
        placed.append((path, var.replace(jax.device_put(value, sharding))))
        del layers, value  # each host copy is freed before the next tensor is read
    if config.tie_word_embeddings and _TIED_HEAD_KEY in tensors:
        embed_key = rules_for(config, set(tensors))[0].hf
        if embed_key in tensors and not np.array_equal(np.asarray(tensors[_TIED_HEAD_KEY]),
                                                       np.asarray(tensors[embed_key])):
            mismatched.append(f"{_TIED_HEAD_KEY}: config ties the head to the embedding but the checkpoint's "
                              "head differs")
        used.add(_TIED_HEAD_KEY)
    unused = sorted(k for k in set(tensors) - used if not any(p.match(k) for p in _BUFFER_PATTERNS))
    problems = []
    if missing:
        problems.append(f"missing keys: {sorted(missing)}")
    if unused:
        problems.append(f"unused keys (not part of a {config.model_type} model of this config): {unused}")
    if mismatched:
        problems.append("shape mismatches: " + "; ".join(mismatched))
    if problems:
        raise CheckpointError(f"{source} does not match the {config.model_type} model: " + " | ".join(problems))
    model = nnx.merge(graphdef, nnx.from_flat_state(placed))
    if mesh is not None:
        from maxmin_jax.sharding import set_activation_mesh

        set_activation_mesh(model, mesh)
    return model


# Export ---------------------------------------------------------------------------------------------------------
def to_hf_tensors(model: CausalLM) -> dict[str, np.ndarray]:
    """The module's parameters under HF names and layouts (LoRA adapters excluded: merge them first)."""
    config = model.config
    rules = {r.ours: r for r in rules_for(config)}
    out: dict[str, np.ndarray] = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        name = "/".join(map(str, path))
        if "_lora_" in name:
            continue
        rule = rules[name]
        value = np.asarray(jax.device_get(var.get_value()))
        if "{i}" in rule.hf:
            for i in range(config.num_layers):
                out[rule.hf.format(i=i)] = np.ascontiguousarray(rule.to_hf(value[i]))
        else:
            out[rule.hf] = np.ascontiguousarray(rule.to_hf(value))
    return out


def save_pretrained(model: CausalLM, directory: str | os.PathLike) -> Path:
    """Write config.json and model.safetensors that transformers (and `load_pretrained`) load back."""
    from safetensors.numpy import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = to_hf_tensors(model)
    dtype = next(iter(tensors.values())).dtype
    hf_config = {**model.config.to_hf(), "dtype": "bfloat16" if dtype == ml_dtypes.bfloat16 else str(dtype)}
    (directory / "config.json").write_text(json.dumps(hf_config, indent=2))
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    return directory
