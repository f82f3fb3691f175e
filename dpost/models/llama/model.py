"""Llama-family decoder (Llama 2/3, TinyLlama, SmolLM2) as a Flax linen module.

Layers are scanned (`nn.scan`): parameters carry a leading `layers` axis, which keeps compile time
independent of depth (`scan_layers=False` runs the same stacked params in a Python loop instead).
Attention supports any number of KV heads (grouped-query attention) and an explicit KV cache for
the sampler. Every family module exposes the same three entry points used by
scoring, training and sampling:

  completion_logits(prompt, prompt_mask, completion, completion_mask) -> [B, C, V]
  prefill(prompt, prompt_mask, max_new_tokens, num_samples) -> (logits [B*n, V], state)
  decode_step(tokens [B*n], state) -> (logits [B*n, V], state)

The decode state is per row (cache, key validity, position and cache slot of the next token), so a
batch may hold rows at different positions (continuous batching refills finished rows).
Prompts are left-padded so that every row's last prompt token sits at the same slot.

`dropout_rate` > 0 (training only: the SFT step clones the module with it) drops attention
probabilities as transformers' LlamaAttention does with `attention_dropout`; it needs a "dropout"
rng. At 0 (every module as loaded) the model is deterministic and takes no rng.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dpost.models import layers
from dpost.models.layers import NEG_INF, RMSNorm, constrain, dropout, param_with_axes


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 4096
    # Llama-3.1 style frequency scaling: None or (key, value) pairs of factor, low_freq_factor,
    # high_freq_factor, original_max_position_embeddings (pairs, not a dict: configs must hash for jit).
    rope_scaling: tuple | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    pad_token_id: int | None = None
    dtype: str = "float32"  # compute dtype; parameters are always fp32 masters
    remat: str = "none"  # layers.REMATS (True / False read as full / none): what a training layer keeps
    scan_layers: bool = True  # training, scoring and prefill layers in nn.scan; False: a Python loop
    attention: str = "einsum"  # layers.ATTENTIONS: training, scoring and prefill attention

    def __post_init__(self):
        layers.check_attention(self.attention)
        object.__setattr__(self, "remat", layers.remat_name(self.remat))
        if self.rope_scaling is not None:
            object.__setattr__(self, "rope_scaling", tuple(sorted((str(k), float(v)) for k, v in dict(self.rope_scaling).items())))

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    def replace(self, **changes) -> "LlamaConfig":
        return dataclasses.replace(self, **changes)


def rope_frequencies(config: LlamaConfig) -> jax.Array:
    """Inverse frequencies [head_dim // 2], with optional Llama-3.1 scaling."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
    if not config.rope_scaling:
        return inv_freq
    scaling = dict(config.rope_scaling)
    factor = scaling["factor"]
    low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    low_wavelen, high_wavelen = old_len / low, old_len / high
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    scaled = jnp.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return jnp.where(is_medium, smoothed, scaled)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """Rotary embedding in transformers' half-split layout. x: [B, T, N, D]; positions: [B, T]."""
    angles = positions[..., None].astype(jnp.float32) * inv_freq  # [B, T, D/2]
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    x32 = x.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def write_rows(cache, new, index):
    """Writes one step's keys or values new [B, KV, 1, D] into cache [B, KV, S, D] at slot
    index[b] of each row b (rows decode at their own positions under continuous batching)."""
    rows = jnp.arange(cache.shape[0])
    return cache.at[rows, :, index].set(new[:, :, 0].astype(cache.dtype), mode="drop")


class Attention(nn.Module):
    config: LlamaConfig
    dropout_rate: float = 0.0

    @nn.compact
    def __call__(self, x, positions, mask, cache, cache_index, layer):
        cfg = self.config
        dt = cfg.compute_dtype
        init = nn.initializers.normal(0.02)
        d, h, kv, hd = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        wq = param_with_axes(self, "q", init, (d, h, hd), ("embed", "heads", "head_dim"))
        wk = param_with_axes(self, "k", init, (d, kv, hd), ("embed", "kv_heads", "head_dim"))
        wv = param_with_axes(self, "v", init, (d, kv, hd), ("embed", "kv_heads", "head_dim"))
        wo = param_with_axes(self, "o", init, (h, hd, d), ("heads", "head_dim", "embed"))

        q = jnp.einsum("btd,dnh->btnh", x, wq.astype(dt))
        k = jnp.einsum("btd,dnh->btnh", x, wk.astype(dt))
        v = jnp.einsum("btd,dnh->btnh", x, wv.astype(dt))
        inv_freq = rope_frequencies(cfg)
        q = constrain(apply_rope(q, positions, inv_freq), ("batch", "length", "act_heads", None))
        k = apply_rope(k, positions, inv_freq)

        b, t = q.shape[0], q.shape[1]
        g = h // kv
        k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # the cache layout [B, KV, S, D]
        if cache is not None and layer is None:  # this layer's own cache [B, KV, S, D] (unrolled decode)
            cache = {"k": write_rows(cache["k"], k, cache_index), "v": write_rows(cache["v"], v, cache_index)}
            k, v = cache["k"].astype(dt), cache["v"].astype(dt)
        elif cache is not None:
            # The whole-model cache [L, B, KV, S, D] rides in the layer scan's carry (prefill): this
            # layer's keys/values are written in place rather than copied through scan outputs.
            cache = {
                "k": jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype)[None], (layer, 0, 0, cache_index, 0)),
                "v": jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype)[None], (layer, 0, 0, cache_index, 0)),
            }
            k = jax.lax.dynamic_index_in_dim(cache["k"], layer, keepdims=False).astype(dt)
            v = jax.lax.dynamic_index_in_dim(cache["v"], layer, keepdims=False).astype(dt)
        s = k.shape[2]
        if t == 1 and layer is None:
            # Decode: multiply-and-reduce fusions stream the cache once; batched [G, Dh] x [Dh, S]
            # matmuls this small run far below the memory bound on CPU.
            q1 = q.reshape(b, kv, g, 1, hd).astype(jnp.float32)
            scores = jnp.sum(q1 * k[:, :, None].astype(jnp.float32), axis=-1) / math.sqrt(hd)  # [B, KV, G, S]
            scores = jnp.where(mask[:, None, :, :], scores, NEG_INF)  # mask [B, 1, S]
            probs = jax.nn.softmax(scores, axis=-1)
            out = jnp.sum(probs[..., None] * v[:, :, None].astype(jnp.float32), axis=-2).astype(dt)  # [B, KV, G, Dh]
            out = out.reshape(b, 1, h, hd)
        elif cfg.attention == "fused" and self.dropout_rate == 0:
            out = layers.fused_attention(q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), mask=mask[:, None],
                                         scale=1 / math.sqrt(hd))
        else:
            # Batch-leading layout [B, KV, G*T, D] x [B, KV, S, D]: query heads grouped by their
            # shared KV head, so each group is one plain batched matmul (several times faster on CPU
            # than contracting over interleaved batch axes).
            q = q.reshape(b, t, kv, g, hd).transpose(0, 2, 3, 1, 4).reshape(b, kv, g * t, hd)
            scores = jnp.einsum("bkqh,bksh->bkqs", q, k).astype(jnp.float32) / math.sqrt(hd)
            scores = jnp.where(mask[:, None, None, :, :], scores.reshape(b, kv, g, t, s), NEG_INF)
            probs = jax.nn.softmax(scores, axis=-1).astype(dt).reshape(b, kv, g * t, s)
            probs = dropout(self.dropout_rate)(probs)  # identity at rate 0
            out = jnp.einsum("bkqs,bksh->bkqh", probs, v)
            out = out.reshape(b, kv, g, t, hd).transpose(0, 3, 1, 2, 4).reshape(b, t, h, hd)
        out = constrain(out, ("batch", "length", "act_heads", None))
        # [B, T, H*Dh] x [H*Dh, D]: one plain matmul (contracting (H, Dh) of a 3-D weight made XLA
        # transpose the weight at every decode step).
        out = out.reshape(b, t, h * hd) @ wo.reshape(h * hd, d).astype(dt)
        return out, cache


class MLP(nn.Module):
    config: LlamaConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        dt = cfg.compute_dtype
        init = nn.initializers.normal(0.02)
        d, f = cfg.hidden_size, cfg.intermediate_size
        gate = param_with_axes(self, "gate", init, (d, f), ("embed", "mlp"))
        up = param_with_axes(self, "up", init, (d, f), ("embed", "mlp"))
        down = param_with_axes(self, "down", init, (f, d), ("mlp", "embed"))
        hidden = nn.silu(x @ gate.astype(dt)) * (x @ up.astype(dt))
        hidden = constrain(hidden, ("batch", "length", "act_mlp"))
        return hidden @ down.astype(dt)


class DecoderLayer(nn.Module):
    config: LlamaConfig
    dropout_rate: float = 0.0

    @nn.compact
    def __call__(self, carry, positions, mask, cache_index, layer):
        """carry = (x [B, T, D], cache): the whole-model cache with `layer` this layer's index (scanned
        prefill), this layer's own cache with `layer` None (unrolled decode), or None (training)."""
        cfg = self.config
        x, cache = carry
        h, cache = Attention(cfg, self.dropout_rate, name="attn")(
            RMSNorm(cfg.rms_norm_eps, cfg.compute_dtype, name="attn_norm")(x), positions, mask, cache, cache_index, layer
        )
        x = x + h
        x = x + MLP(cfg, name="mlp")(RMSNorm(cfg.rms_norm_eps, cfg.compute_dtype, name="mlp_norm")(x))
        return (constrain(x, ("batch", "length", "act_embed")), cache), None


class Llama(nn.Module):
    config: LlamaConfig
    dropout_rate: float = 0.0  # training only (see the module doc)

    def setup(self):
        cfg = self.config
        self.embed = param_with_axes(
            self, "embed", nn.initializers.normal(0.02), (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed")
        )
        self.layers = nn.scan(
            layers.remat_layer(DecoderLayer, cfg.remat),
            variable_axes={"params": 0},
            split_rngs={"params": True, "dropout": True},
            in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, 0),  # positions, mask, cache index; layer index
            length=cfg.num_layers,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )(cfg, self.dropout_rate, name="layers")
        self.final_norm = RMSNorm(cfg.rms_norm_eps, cfg.compute_dtype)
        if not cfg.tie_word_embeddings:
            self.lm_head = param_with_axes(
                self, "lm_head", nn.initializers.normal(0.02), (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab")
            )

    # -- core -------------------------------------------------------------------------------------
    def hidden_states(self, tokens, positions, mask, cache=None, cache_index=None):
        """tokens/positions [B, T]; mask [B, T, S] (S = T, or the cache length). -> ([B, T, D], cache)."""
        dt = self.config.compute_dtype
        x = jnp.take(self.embed, tokens, axis=0).astype(dt)
        x = constrain(x, ("batch", "length", "act_embed"))
        index = jnp.asarray(0 if cache_index is None else cache_index, jnp.int32)
        cfg = self.config
        if cfg.scan_layers or self.is_initializing():
            (x, cache), _ = self.layers((x, cache), positions, mask, index, jnp.arange(cfg.num_layers))
        else:
            layer = layers.remat_layer(DecoderLayer, cfg.remat, scanned=False)(cfg, self.dropout_rate, parent=None)
            x, cache = layers.unrolled_layers(self, layer, (x, cache), positions, mask, index, with_index=True)
        return self.final_norm(x), cache

    def vocab_head(self):
        """The vocabulary head as fp32 rows [V, D]: the tied embedding or lm_head transposed
        (`logits` = hidden @ vocab_head().T in the compute dtype; `scoring` slices it by rows)."""
        return self.embed if self.config.tie_word_embeddings else self.lm_head.T

    def logits(self, hidden):
        head = self.vocab_head().T  # [D, V]; for an untied head the two transposes cancel
        return constrain(hidden @ head.astype(self.config.compute_dtype), ("batch", "length", "act_vocab"))

    def __call__(self, tokens, positions=None, mask=None, cache=None, cache_index=None):
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        if mask is None:
            mask = layers.causal_padding_mask(jnp.ones(tokens.shape, bool))
        hidden, cache = self.hidden_states(tokens, positions, mask, cache, cache_index)
        return self.logits(hidden), cache

    # -- family interface ---------------------------------------------------------------------------
    def completion_hidden(self, prompt, prompt_mask, completion, completion_mask):
        """Final hidden states of the positions that predict each completion token: [B, C, D].
        Prompt left-padded, completion right-padded."""
        p = prompt.shape[1]
        tokens = jnp.concatenate([prompt, completion], axis=1)
        valid = jnp.concatenate([prompt_mask, completion_mask], axis=1).astype(bool)
        hidden, _ = self.hidden_states(
            tokens, layers.positions_from_mask(valid), layers.causal_padding_mask(valid)
        )
        return hidden[:, p - 1 : -1]

    def completion_logits(self, prompt, prompt_mask, completion, completion_mask):
        """Logits predicting each completion token: [B, C, V]. Only the positions that predict
        completion tokens reach the (vocab-sized) head."""
        return self.logits(self.completion_hidden(prompt, prompt_mask, completion, completion_mask))

    def init_cache(self, batch: int, length: int):
        cfg = self.config
        shape = (cfg.num_layers, batch, cfg.num_kv_heads, length, cfg.head_dim)
        return {"k": jnp.zeros(shape, cfg.compute_dtype), "v": jnp.zeros(shape, cfg.compute_dtype)}

    def prefill(self, prompt, prompt_mask, max_new_tokens: int, num_samples: int = 1):
        b, p = prompt.shape
        valid = prompt_mask.astype(bool)
        positions = layers.positions_from_mask(valid)
        # Prompt positions attend over the prompt only (not the empty decode slots), so prefill's
        # attention cost does not grow with max_new_tokens.
        cache = self.init_cache(b, p)
        hidden, cache = self.hidden_states(prompt, positions, layers.causal_padding_mask(valid), cache, 0)
        logits = self.logits(hidden[:, -1:])[:, 0]
        kv_valid = jnp.concatenate([valid, jnp.zeros((b, max_new_tokens), bool)], axis=1)
        # Decoding keeps one cache buffer per layer [B*n, KV, p + max_new_tokens, D], updated in place.
        slots = ((0, 0), (0, 0), (0, max_new_tokens), (0, 0))
        per_layer = tuple({"k": jnp.pad(cache["k"][i], slots), "v": jnp.pad(cache["v"][i], slots)}
                          for i in range(self.config.num_layers))
        state = {
            "cache": layers.repeat_batch(per_layer, num_samples),
            "kv_valid": kv_valid,
            "next_position": positions[:, -1] + 1,
            "index": jnp.full((b,), p, jnp.int32),  # per row: the slot its next token goes to
        }
        state["kv_valid"], state["next_position"], state["index"] = layers.repeat_batch(
            (state["kv_valid"], state["next_position"], state["index"]), num_samples
        )
        return layers.repeat_batch(logits, num_samples), state

    def decode_step(self, tokens, state):
        """One token per row, written at the row's own cache slot `state["index"]` [B] (rows of a
        continuous batch sit at different positions). Layers run unrolled over per-layer caches and
        per-layer params (the `decode_layout` of the params when the caller made it, else slices of
        the stacked ones): a scanned loop would copy each layer's weights and cache slice out of the
        stacked buffers at every step, which doubles the memory traffic of a memory-bound decode."""
        cfg = self.config
        index = state["index"]
        kv_valid = state["kv_valid"].at[jnp.arange(tokens.shape[0]), index].set(True, mode="drop")
        positions = state["next_position"][:, None]
        x = constrain(jnp.take(self.embed, tokens[:, None], axis=0).astype(cfg.compute_dtype),
                      ("batch", "length", "act_embed"))
        stacked = self.variables["params"]["layers"]
        layer = DecoderLayer(cfg, parent=None)
        cache = []
        for i, layer_cache in enumerate(state["cache"]):
            (x, layer_cache), _ = layer.apply({"params": layers.layer_params(stacked, i)}, (x, layer_cache),
                                              positions, kv_valid[:, None, :], index, None)
            cache.append(layer_cache)
        hidden = self.final_norm(x)
        new_state = {"cache": tuple(cache), "kv_valid": kv_valid, "next_position": state["next_position"] + 1,
                     "index": index + 1}
        return self.logits(hidden)[:, 0], new_state

    @staticmethod
    def decode_layout(params, compute_dtype):
        """Params as `decode_step` reads them fastest: the stacked layer params split into one
        buffer per layer and the matrices in the compute dtype (one copy, made once per sampling
        call, outside the decode loop)."""
        return layers.cast_matrices({**params, "layers": layers.split_layers(params["layers"])}, compute_dtype)


def make_module(config: LlamaConfig) -> Llama:
    return Llama(config)


def init_params(config: LlamaConfig, rng: jax.Array) -> Any:
    """Random boxed params (LogicallyPartitioned leaves); `nn.unbox` strips the axis metadata."""
    tokens = jnp.zeros((1, 2), jnp.int32)
    return Llama(config).init(rng, tokens)["params"]
CONFIG_CLASS = LlamaConfig
