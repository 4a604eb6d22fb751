"""The work a causal LM must do: matmul FLOPs per token, attention FLOPs, bytes of weights and KV cache per
decode step. The conventions (full-square attention, what counts as a matmul weight) are in METHOD.md.
"""

from __future__ import annotations

import dataclasses

from flax import nnx

# Block weights that multiply activations, per family (the stacked [L, ...] arrays in `model.layers`).
MATMUL_WEIGHTS = {"gpt2": ("qkv", "attn_out", "fc", "proj"),
                  "llama": ("q", "k", "v", "o", "gate", "up", "down")}
# Embedding tables that are only gathered (B rows per step), never read whole, when they are not also the head.
GATHERED = {"gpt2": ("wpe",), "llama": ("embed",)}


@dataclasses.dataclass(frozen=True)
class ModelCost:
    """Parameter counts of one model instance, and the FLOPs / bytes that follow from them."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    params_total: int  # every base parameter (LoRA adapters excluded)
    params_matmul: int  # block matmul weights + LM head: 2 FLOPs each per token
    params_head: int  # the LM head matrix (part of params_matmul)
    params_read: int  # read once per decode step: everything but gather-only embedding tables
    lora_params: int  # LoRA adapter parameters (0 without adapters)
    itemsize: int  # bytes per parameter

    # FLOPs ---------------------------------------------------------------------------------------------------
    def attention_flops(self, batch: int, queries: int, keys: int) -> float:
        """QK^T and PV over every (query, key) pair, masked ones included: 2 matmuls x 2 FLOPs x head_dim."""
        return 4.0 * batch * self.num_layers * self.num_heads * self.head_dim * queries * keys

    def forward_flops(self, batch: int, seq: int, keys: int | None = None) -> float:
        return 2.0 * self.params_matmul * batch * seq + self.attention_flops(batch, seq, seq if keys is None else keys)

    def prefill_flops(self, batch: int, seq: int) -> float:
        """Forward over a prompt, the LM head applied to the last position only (what sampling needs)."""
        trunk = self.params_matmul - self.params_head
        return 2.0 * (trunk * batch * seq + self.params_head * batch) + self.attention_flops(batch, seq, seq)

    def train_flops(self, batch: int, seq: int, *, lora: bool) -> float:
        """One forward + backward step. Full-weight: 3x forward (activation and weight gradients each cost a
        forward). LoRA: forward + activation gradients of the frozen matmuls (2N + 2N per token), attention
        3x forward (no weights, so its backward is activation gradients only), adapters 6 FLOPs per parameter."""
        tokens = batch * seq
        dense = 2.0 * self.params_matmul * tokens
        attention = self.attention_flops(batch, seq, seq)
        if not lora:
            return 3.0 * (dense + attention)
        return 2.0 * dense + 3.0 * attention + 6.0 * self.lora_params * tokens

    # Bytes ---------------------------------------------------------------------------------------------------
    @property
    def weight_bytes(self) -> int:
        """Bytes of weights one decode step reads (each parameter once)."""
        return self.params_read * self.itemsize

    def kv_bytes(self, batch: int, positions: float, itemsize: int | None = None) -> float:
        """Bytes of keys and values for `positions` cached tokens per row, all layers."""
        item = self.itemsize if itemsize is None else itemsize
        return 2.0 * batch * self.num_layers * self.num_kv_heads * self.head_dim * positions * item


def model_cost(model) -> ModelCost:
    """Count parameters of a `maxmin_jax` causal LM (GPT-2 or Llama), from its state."""
    cfg = model.config
    family = cfg.model_type
    if family not in MATMUL_WEIGHTS:
        raise ValueError(f"no cost model for model_type {family!r}; known: {sorted(MATMUL_WEIGHTS)}")
    sizes: dict[str, int] = {}
    itemsizes = set()
    lora = 0
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        name = "/".join(map(str, path))
        value = var.get_value()
        if isinstance(var, nnx.LoRAParam) or "_lora_" in name:
            lora += value.size
            continue
        sizes[name] = value.size
        itemsizes.add(value.dtype.itemsize)
    if len(itemsizes) != 1:
        raise ValueError(f"mixed parameter dtypes (itemsizes {sorted(itemsizes)}); byte counts would be ambiguous")
    tied = cfg.tie_word_embeddings
    head = "wte" if family == "gpt2" else ("embed" if tied else "lm_head")
    matmul = sum(sizes[f"layers/{w}"] for w in MATMUL_WEIGHTS[family]) + sizes[head]
    gathered = sum(sizes[g] for g in GATHERED[family] if g in sizes and g != head)
    return ModelCost(num_layers=cfg.num_layers, num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads,
                     head_dim=cfg.dim_per_head, params_total=sum(sizes.values()), params_matmul=matmul,
                     params_head=sizes[head], params_read=sum(sizes.values()) - gathered, lora_params=lora,
                     itemsize=itemsizes.pop())


def sampling_floor_s(cost: ModelCost, *, batch: int, prompt: int, new_tokens: int, flops_per_s: float,
                     bytes_per_s: float) -> dict[str, float]:
    """Roofline floor of sampling `new_tokens` after a `prompt`-token prefill: the prefill at the matmul peak,
    then each of the `new_tokens - 1` decode steps at the larger of (FLOPs / peak) and (bytes / bandwidth), where
    a step reads every weight once plus the keys and values of the tokens cached so far."""
    prefill = cost.prefill_flops(batch, prompt) / flops_per_s
    decode = 0.0
    for step in range(1, new_tokens):
        cached = prompt + step
        flops = 2.0 * cost.params_matmul * batch + cost.attention_flops(batch, 1, cached)
        nbytes = cost.weight_bytes + cost.kv_bytes(batch, cached)
        decode += max(flops / flops_per_s, nbytes / bytes_per_s)
    return {"prefill_s": prefill, "decode_s": decode, "total_s": prefill + decode,
            "weights_only_step_s": cost.weight_bytes / bytes_per_s}
