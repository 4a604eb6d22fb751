"""Llama family (Llama-2, Tulu2) as a Flax NNX module: RMSNorm, RoPE, grouped-query attention, SwiGLU."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from maxmin_jax.models.attention import AttentionImpl
from maxmin_jax.models.config import LlamaConfig
from maxmin_jax.models.layers import (Stack, apply_rope, attend_with_cache, float32_logits, normal_init, ones_init,
                                      param, rms_norm)
from maxmin_jax.models.transformer import CausalLM, RematPolicy


class LlamaForCausalLM(CausalLM):
    """Matches transformers' LlamaForCausalLM (default RoPE, no biases), MHA / GQA / MQA, tied or untied head."""

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=None,
                 scan_layers: bool = True, remat: RematPolicy = "none", attention_impl: AttentionImpl = "auto",
                 mesh: Mesh | None = None):
        super().__init__(config, dtype=dtype, param_dtype=param_dtype, scan_layers=scan_layers, remat=remat,
                         attention_impl=attention_impl, mesh=mesh)
        dtype = self.param_dtype
        c = config
        L, D, H, KV, Dh, F = c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.dim_per_head, c.mlp_size
        self.embed = param(rngs, normal_init, (c.vocab_size, D), ("vocab", "embed"), dtype)
        layers = Stack()
        layers.attn_norm = param(rngs, ones_init, (L, D), ("layers", None), dtype)
        layers.q = param(rngs, normal_init, (L, D, H, Dh), ("layers", "embed", "heads", None), dtype)
        layers.k = param(rngs, normal_init, (L, D, KV, Dh), ("layers", "embed", "kv_heads", None), dtype)
        layers.v = param(rngs, normal_init, (L, D, KV, Dh), ("layers", "embed", "kv_heads", None), dtype)
        layers.o = param(rngs, normal_init, (L, H, Dh, D), ("layers", "heads", None, "embed"), dtype)
        layers.mlp_norm = param(rngs, ones_init, (L, D), ("layers", None), dtype)
        layers.gate = param(rngs, normal_init, (L, D, F), ("layers", "embed", "mlp"), dtype)
        layers.up = param(rngs, normal_init, (L, D, F), ("layers", "embed", "mlp"), dtype)
        layers.down = param(rngs, normal_init, (L, F, D), ("layers", "mlp", "embed"), dtype)
        self.layers = layers
        self.norm = param(rngs, ones_init, (D,), (None,), dtype)
        if not c.tie_word_embeddings:
            self.lm_head = param(rngs, normal_init, (D, c.vocab_size), ("embed", "vocab"), dtype)

    def _embed(self, input_ids, positions):
        return self.embed[...][input_ids].astype(self.dtype)

    def _block(self, p, x, ctx, cache, layer):
        c = self.config
        h = rms_norm(x, p["attn_norm"], c.rms_norm_eps)
        q = apply_rope(self.lora_project(p, "q", h, "btd,dhk->bthk"), ctx.positions, c.rope_theta)
        k = apply_rope(self.lora_project(p, "k", h, "btd,dhk->bthk"), ctx.positions, c.rope_theta)
        v = self.lora_project(p, "v", h, "btd,dhk->bthk")
        out, cache = attend_with_cache(q, k, v, ctx, cache, layer, implementation=self.attention_impl,
                                       mesh=self.mesh)
        x = x + self.lora_project(p, "o", out, "bthk,hkd->btd")
        h = rms_norm(x, p["mlp_norm"], c.rms_norm_eps)
        gated = jax.nn.silu(self.lora_project(p, "gate", h, "btd,df->btf")) * self.lora_project(p, "up", h,
                                                                                                 "btd,df->btf")
        x = x + self.lora_project(p, "down", gated, "btf,fd->btd")
        return x, cache

    def _final_norm(self, x):
        return rms_norm(x, self.norm[...], self.config.rms_norm_eps)

    def logits(self, hidden):
        if self.config.tie_word_embeddings:
            return float32_logits("btd,vd->btv", hidden, self.embed[...])
        return float32_logits("btd,dv->btv", hidden, self.lm_head[...])
