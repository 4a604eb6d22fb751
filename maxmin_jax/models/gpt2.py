"""GPT-2 as a Flax NNX module: learned positions, pre-LayerNorm blocks, fused QKV, GELU (tanh) MLP, tied head."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from maxmin_jax.models.attention import AttentionImpl
from maxmin_jax.models.config import GPT2Config
from maxmin_jax.models.layers import (Stack, attend_with_cache, float32_logits, layer_norm, normal_init, ones_init,
                                      param, zeros_init)
from maxmin_jax.models.transformer import CausalLM, RematPolicy


class GPT2LMHeadModel(CausalLM):
    """Matches transformers' GPT2LMHeadModel. QKV is stored as [D, 3, heads, head_dim] so tensor parallelism
    splits whole heads rather than slicing the fused 3*D axis across q, k and v."""

    def __init__(self, config: GPT2Config, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=None,
                 scan_layers: bool = True, remat: RematPolicy = "none", attention_impl: AttentionImpl = "auto",
                 mesh: Mesh | None = None):
        super().__init__(config, dtype=dtype, param_dtype=param_dtype, scan_layers=scan_layers, remat=remat,
                         attention_impl=attention_impl, mesh=mesh)
        dtype = self.param_dtype
        c = config
        L, D, H, Dh, F = c.num_layers, c.hidden_size, c.num_heads, c.head_dim, c.mlp_size
        self.wte = param(rngs, normal_init, (c.vocab_size, D), ("vocab", "embed"), dtype)
        self.wpe = param(rngs, normal_init, (c.max_position_embeddings, D), (None, "embed"), dtype)
        layers = Stack()
        layers.ln_1_scale = param(rngs, ones_init, (L, D), ("layers", None), dtype)
        layers.ln_1_bias = param(rngs, zeros_init, (L, D), ("layers", None), dtype)
        layers.qkv = param(rngs, normal_init, (L, D, 3, H, Dh), ("layers", "embed", None, "heads", None), dtype)
        layers.qkv_bias = param(rngs, zeros_init, (L, 3, H, Dh), ("layers", None, "heads", None), dtype)
        layers.attn_out = param(rngs, normal_init, (L, H, Dh, D), ("layers", "heads", None, "embed"), dtype)
        layers.attn_out_bias = param(rngs, zeros_init, (L, D), ("layers", None), dtype)
        layers.ln_2_scale = param(rngs, ones_init, (L, D), ("layers", None), dtype)
        layers.ln_2_bias = param(rngs, zeros_init, (L, D), ("layers", None), dtype)
        layers.fc = param(rngs, normal_init, (L, D, F), ("layers", "embed", "mlp"), dtype)
        layers.fc_bias = param(rngs, zeros_init, (L, F), ("layers", "mlp"), dtype)
        layers.proj = param(rngs, normal_init, (L, F, D), ("layers", "mlp", "embed"), dtype)
        layers.proj_bias = param(rngs, zeros_init, (L, D), ("layers", None), dtype)
        self.layers = layers
        self.ln_f_scale = param(rngs, ones_init, (D,), (None,), dtype)
        self.ln_f_bias = param(rngs, zeros_init, (D,), (None,), dtype)

    def _embed(self, input_ids, positions):
        return (self.wte[...][input_ids] + self.wpe[...][positions]).astype(self.dtype)

    def _block(self, p, x, ctx, cache, layer):
        eps = self.config.layer_norm_epsilon
        h = layer_norm(x, p["ln_1_scale"], p["ln_1_bias"], eps)
        qkv = self.lora_project(p, "qkv", h, "btd,dchk->btchk") + p["qkv_bias"].astype(h.dtype)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        out, cache = attend_with_cache(q, k, v, ctx, cache, layer, implementation=self.attention_impl,
                                       mesh=self.mesh)
        x = x + self.lora_project(p, "attn_out", out, "bthk,hkd->btd") + p["attn_out_bias"].astype(x.dtype)
        h = layer_norm(x, p["ln_2_scale"], p["ln_2_bias"], eps)
        h = jax.nn.gelu(self.lora_project(p, "fc", h, "btd,df->btf") + p["fc_bias"].astype(h.dtype), approximate=True)
        x = x + self.lora_project(p, "proj", h, "btf,fd->btd") + p["proj_bias"].astype(x.dtype)
        return x, cache

    def _final_norm(self, x):
        return layer_norm(x, self.ln_f_scale[...], self.ln_f_bias[...], self.config.layer_norm_epsilon)

    def logits(self, hidden):
        return float32_logits("btd,vd->btv", hidden, self.wte[...])
