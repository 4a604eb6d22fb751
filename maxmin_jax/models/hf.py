"""Strict Hugging Face checkpoint <-> Flax mapping: `load_pretrained` and `save_pretrained`.

Every parameter of the module names the checkpoint key(s) it comes from and the exact reshape/transpose; loading
fails, listing the keys, if a key is missing, left unused, or has the wrong shape. The module is built abstractly
(`nnx.eval_shape`) and each tensor is read (memory-mapped), converted and placed straight into its sharding, so a
7B model is never materialised twice.
"""

from __future__ import annotations

import dataclasses
import difflib
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

from maxmin_jax.errors import CheckpointError
from maxmin_jax.models import build_model
from maxmin_jax.models.config import GPT2Config, LlamaConfig, ModelConfig, config_from_hf
from maxmin_jax.models.lora import merged_weights
from maxmin_jax.models.transformer import CausalLM
from maxmin_jax.sharding import place_variable


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
_MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024  # the format's own limit on the JSON header
_WEIGHT_SUFFIXES = (".safetensors", ".bin")
# A hub repo id: "name" or "owner/name" (letters, digits, "-", "_", ".").
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def _safetensors_header(path: Path) -> tuple[dict, int, int]:
    """(header, data start, data length) of a .safetensors file, every field checked against the file's size."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        if size < 8 or length > min(size - 8, _MAX_SAFETENSORS_HEADER):
            raise CheckpointError(f"{path}: not a valid safetensors file: its first 8 bytes give a header of "
                                  f"{length} bytes, but the file has {size} bytes (truncated, or not safetensors)",
                                  path=path)
        raw = f.read(length)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: not a valid safetensors file: the header is not JSON ({err})",
                              path=path) from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a valid safetensors file: the header is a JSON "
                              f"{type(header).__name__}, expected an object", path=path)
    return header, 8 + length, size - 8 - length


def _check_entry(path: Path, key: str, meta, data_length: int) -> None:
    """One header entry: a known dtype, a shape, and offsets that hold exactly that many bytes inside the file."""
    ok = (isinstance(meta, dict) and isinstance(meta.get("shape"), list)
          and all(isinstance(d, int) and d >= 0 for d in meta["shape"])
          and isinstance(meta.get("data_offsets"), list) and len(meta["data_offsets"]) == 2
          and all(isinstance(o, int) for o in meta["data_offsets"]) and 0 <= meta["data_offsets"][0]
          <= meta["data_offsets"][1])
    if not ok:
        raise CheckpointError(f"{path}: not a valid safetensors file: tensor {key!r} has header entry {meta!r}; "
                              "expected dtype, shape and data_offsets [start, end]", path=path)
    if meta.get("dtype") not in _SAFETENSORS_DTYPES:
        raise CheckpointError(f"{path}: tensor {key} has dtype {meta.get('dtype')}, which this loader cannot read",
                              path=path)
    start, end = meta["data_offsets"]
    expected = int(np.prod(meta["shape"])) * np.dtype(_SAFETENSORS_DTYPES[meta["dtype"]]).itemsize
    if end - start != expected:
        raise CheckpointError(f"{path}: tensor {key}: its offsets span {end - start} bytes, but shape "
                              f"{meta['shape']} of {meta['dtype']} needs {expected}", path=path)
    if end > data_length:
        raise CheckpointError(f"{path}: truncated: tensor {key} needs bytes {start}..{end} of the data, but the "
                              f"file holds only {data_length} bytes of data (re-download or re-save it)", path=path)


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Memory-mapped views of every tensor in a .safetensors file (bfloat16 included, via ml_dtypes). The header
    is checked first, so a corrupt or truncated file is a `CheckpointError` naming it, never a garbage array."""
    header, data_start, data_length = _safetensors_header(path)
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    for key, meta in tensors.items():
        _check_entry(path, key, meta, data_length)
    data = (np.memmap(path, dtype=np.uint8, mode="r", offset=data_start) if data_length
            else np.zeros(0, np.uint8))  # mmap cannot map zero bytes
    out = {}
    for key, meta in tensors.items():
        start, end = meta["data_offsets"]
        out[key] = data[start:end].view(_SAFETENSORS_DTYPES[meta["dtype"]]).reshape(meta["shape"])
    return out


def _read_torch_bin(path: Path) -> dict[str, np.ndarray]:
    import pickle

    try:
        import torch
    except ImportError as e:  # torch is only needed for legacy .bin checkpoints
        raise CheckpointError(f"{path} is a PyTorch pickle; install torch to read it, or convert to safetensors",
                              path=path) from e
    try:
        # weights_only: the unpickler builds tensors and plain containers only, never arbitrary objects.
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as err:
        # torch's message is a paragraph; the line naming the refused global is the one worth showing.
        lines = [ln.strip() for ln in str(err).splitlines() if "GLOBAL" in ln or "global" in ln]
        reason = lines[0] if lines else type(err).__name__
        raise CheckpointError(f"{path}: refused: the pickle holds more than tensors, and code in a checkpoint is "
                              f"never run ({reason}). Use a safetensors copy from a source you trust.",
                              path=path) from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint (truncated or corrupt?): {err}",
                              path=path) from None
    bad = (next((k for k, t in state.items() if not isinstance(t, torch.Tensor)), None)
           if isinstance(state, dict) else "")
    if bad is not None:
        what = f"entry {bad!r} is a {type(state[bad]).__name__}" if bad else f"it holds a {type(state).__name__}"
        raise CheckpointError(f"{path}: expected a flat mapping of parameter names to tensors, but {what}",
                              path=path)
    out = {}
    for key, t in state.items():
        if t.dtype == torch.bfloat16:
            out[key] = t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        else:
            out[key] = t.numpy()
    return out


def _index_files(directory: Path, index_path: Path) -> list[Path]:
    """The shard files an index names; each must be a file inside `directory` (no absolute paths, no "..")."""
    try:
        index = json.loads(index_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{index_path}: not valid JSON ({err})", path=index_path) from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index_path}: expected an object with a \"weight_map\" of tensor name -> shard file",
                              path=index_path)
    files = []
    for name in sorted(set(weight_map.values())):
        inside = os.path.normpath(name)
        if os.path.isabs(name) or inside == ".." or inside.startswith(".." + os.sep) or "\\" in name:
            raise CheckpointError(f"{index_path}: weight_map names {name!r}, which lies outside the checkpoint "
                                  f"directory {directory}; refusing to read it (shards must be inside it)",
                                  path=index_path)
        if not name.endswith(_WEIGHT_SUFFIXES):
            raise CheckpointError(f"{index_path}: weight_map names {name!r}; expected shard files ending in "
                                  f"{' or '.join(_WEIGHT_SUFFIXES)}", path=index_path)
        if not (directory / inside).is_file():
            raise CheckpointError(f"{index_path}: weight_map names {name!r}, but {directory / inside} does not "
                                  "exist (an incomplete download?)", path=index_path)
        files.append(directory / inside)
    return files


def read_checkpoint(directory: str | os.PathLike) -> dict[str, np.ndarray]:
    """All tensors of a checkpoint directory: model.safetensors, a sharded index, or pytorch_model.bin."""
    directory = Path(directory)
    files: list[Path]
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (directory / index_name).exists():
            files = _index_files(directory, directory / index_name)
            break
    else:
        files = [p for p in (directory / "model.safetensors", directory / "pytorch_model.bin") if p.exists()][:1]
    if not files:
        raise CheckpointError(f"{directory}: no model.safetensors, pytorch_model.bin or sharded index found",
                              path=directory)
    tensors: dict[str, np.ndarray] = {}
    for f in files:
        tensors.update(_read_safetensors(f) if f.suffix == ".safetensors" else _read_torch_bin(f))
    return tensors


def _looks_local(name: str) -> bool:
    """A string meant as a local path: explicit path syntax, or separators that a hub id cannot have, or a
    parent directory that exists here (then "runs/gpt2-tny" is a typo, not the hub repo "runs/gpt2-tny")."""
    if name.startswith(("./", "../", "/", "~", ".\\", "..\\")) or name in (".", ".."):
        return True
    if os.sep in name or "/" in name:
        parent = Path(os.path.expanduser(name)).parent
        return _HUB_ID.match(name) is None or parent.is_dir()
    return False


def _near_misses(path: Path) -> str:
    """"; did you mean runs/gpt2-tiny?" from the directories beside a missing one, or why there are none."""
    if not path.parent.is_dir():
        return f" (nor does {path.parent})"
    try:
        siblings = [d.name for d in path.parent.iterdir() if d.is_dir()]
    except OSError:
        return ""
    near = difflib.get_close_matches(path.name, siblings, n=3)
    return f"; did you mean {' or '.join(str(path.parent / n) for n in near)}?" if near else ""


def resolve_checkpoint_dir(name_or_path: str | os.PathLike) -> Path:
    """A local directory as is; anything else is a hub id, downloaded (config and weights only) to the HF cache.
    A string that looks like a local path but names no directory is an error saying so, not a hub lookup."""
    name = os.fspath(name_or_path)
    path = Path(os.path.expanduser(name))  # never raises, unlike Path.expanduser on an unknown ~user
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{name}: not a checkpoint directory (it is a file; expected a directory with "
                              "config.json and weights)", path=name)
    if _looks_local(name):
        raise CheckpointError(f"{name}: not a checkpoint directory: it does not exist{_near_misses(path)}",
                              path=name)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name, allow_patterns=[
            "config.json", "*.safetensors", "model.safetensors.index.json", "pytorch_model*.bin",
            "pytorch_model.bin.index.json"]))
    except Exception as err:  # noqa: BLE001 - offline, unknown repo, gated...: the name and the cause, no traceback
        raise CheckpointError(f"{name}: not a local directory, and the Hugging Face hub could not provide it "
                              f"({type(err).__name__}: {err})", path=name) from err


# Loading --------------------------------------------------------------------------------------------------------
def _layer_keys(rule: Rule, num_layers: int) -> list[str]:
    return [rule.hf.format(i=i) for i in range(num_layers)] if "{i}" in rule.hf else [rule.hf]


def load_pretrained(name_or_path: str | os.PathLike, *, dtype=jnp.float32, mesh: jax.sharding.Mesh | None = None,
                    **model_kwargs) -> CausalLM:
    """Load a Hugging Face GPT-2 or Llama checkpoint (local directory or hub id) into a Flax NNX causal LM.

    Strict: refuses unknown model types, unimplemented config features, missing or unused checkpoint keys and
    shape mismatches, listing the keys. With `mesh`, each tensor goes straight into its sharding and the model is
    built with that mesh (`CausalLM.mesh`).
    """
    directory = resolve_checkpoint_dir(name_or_path)
    config_path = directory / "config.json"
    if not config_path.exists():
        raise CheckpointError(f"{directory}: no config.json", path=directory)
    try:
        hf_config = json.loads(config_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{config_path}: not valid JSON ({err})", path=config_path) from None
    config = config_from_hf(hf_config, source=str(config_path))
    return convert_hf_tensors(config, read_checkpoint(directory), dtype=dtype, mesh=mesh, source=str(directory),
                              **model_kwargs)


def convert_hf_tensors(config: ModelConfig, tensors: dict[str, np.ndarray], *, dtype=jnp.float32, mesh=None,
                       source: str = "checkpoint", **model_kwargs) -> CausalLM:
    """Build the module abstractly and fill every parameter from `tensors` (HF names), strictly."""
    abstract = nnx.eval_shape(lambda: build_model(config, rngs=nnx.Rngs(0), dtype=dtype, mesh=mesh, **model_kwargs))
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
        placed.append((path, var.replace(jax.device_put(value)) if mesh is None
                       else place_variable(var, value, mesh, name=name)))
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
    return nnx.merge(graphdef, nnx.from_flat_state(placed))


# Export ---------------------------------------------------------------------------------------------------------
def to_hf_tensors(model: CausalLM) -> dict[str, np.ndarray]:
    """The module's parameters under HF names and layouts; LoRA adapters folded into the weights they adapt
    (`merged_weights`: the exported checkpoint computes what the adapted model computes; the model is unchanged)."""
    config = model.config
    rules = {r.ours: r for r in rules_for(config)}
    merged = {f"layers/{name}": value for name, value in merged_weights(model).items()}
    out: dict[str, np.ndarray] = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        name = "/".join(map(str, path))
        if isinstance(var, nnx.LoRAParam):
            continue
        rule = rules[name]
        value = np.asarray(jax.device_get(merged.get(name, var.get_value())))
        if "{i}" in rule.hf:
            for i in range(config.num_layers):
                out[rule.hf.format(i=i)] = np.ascontiguousarray(rule.to_hf(value[i]))
        else:
            out[rule.hf] = np.ascontiguousarray(rule.to_hf(value))
    return out


def save_pretrained(model: CausalLM, directory: str | os.PathLike) -> Path:
    """Write config.json and model.safetensors that transformers (and `load_pretrained`) load back. A LoRA-adapted
    model is exported with its adapters merged into the base weights."""
    from safetensors.numpy import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = to_hf_tensors(model)
    dtype = next(iter(tensors.values())).dtype
    hf_config = {**model.config.to_hf(), "dtype": "bfloat16" if dtype == ml_dtypes.bfloat16 else str(dtype)}
    (directory / "config.json").write_text(json.dumps(hf_config, indent=2))
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    return directory
