"""T5-family encoder-decoder (original T5, T5 v1.1, Flan-T5) as a Flax linen module.

Mirrors `dpost.models.llama.model`: fp32 master parameters with logical axis names, compute in the
config dtype (softmax and norms in fp32), encoder and decoder layers scanned (`nn.scan`, leading
`layers` axis). T5 specifics:

- no attention scaling; positions enter only through a learned relative position bias, one table
  [buckets, heads] per stack (HF keeps it in the stack's first layer and shares it);
- the layer norm is an RMS norm without mean subtraction or bias (`layers.RMSNorm`);
- feed-forward "relu" (original T5) or "gated-gelu" (v1.1 / Flan-T5, tanh-approximate GELU);
- two independent facts about the head, as in transformers 5: `tie_word_embeddings` (the head is the
  shared embedding) and `scale_decoder_outputs` (the decoder output is scaled by d_model**-0.5).
  Original T5 has both, v1.1 / Flan-T5 neither; transformers < 5 had one flag for both, which is
  what `scale_decoder_outputs=None` (the default: same as `tie_word_embeddings`) keeps.

Family interface (same names and meanings as Llama's, so scoring, training and sampling stay
family-agnostic):

  completion_logits(prompt, prompt_mask, completion, completion_mask) -> [B, C, V]
      prompt (left-padded) -> encoder; decoder input = [decoder_start] + completion[:, :-1].
  prefill(prompt, prompt_mask, max_new_tokens, num_samples) -> (logits [B*n, V], state)
      encodes once, runs the decoder on the start token, then repeats everything by num_samples.
  decode_step(tokens [B*n], state) -> (logits [B*n, V], state)

Relative positions are differences of slot indices, so left padding of the prompt (masked as keys)
gives the same result as no padding. The decoder cache has max_new_tokens + 1 slots (the start token
plus one per decode step), so — as with Llama — up to max_new_tokens decode steps may follow prefill.

`dropout_rate` > 0 (training only: the SFT step clones the module with it) drops where
transformers' T5 applies `dropout_rate`: each stack's embedded input and final-norm output, the
attention probabilities, each sublayer's output before its residual add, and the feed-forward
activations before `wo`. It needs a "dropout" rng; at 0 (every module as loaded) nothing changes.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dpost.models import layers
from dpost.models.layers import NEG_INF, RMSNorm, constrain, dropout, param_with_axes

_ACTIVATIONS = {
    "relu": jax.nn.relu,
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}


def parse_feed_forward_proj(spec: str) -> tuple[bool, str]:
    """"gated-gelu" -> (True, "gelu_new") as in transformers; "relu" -> (False, "relu")."""
    parts = spec.split("-")
    if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
        raise ValueError(f"feed_forward_proj {spec!r}: expected 'ACT' or 'gated-ACT'")
    gated, act = len(parts) == 2, parts[-1]
    if spec == "gated-gelu":
        act = "gelu_new"  # transformers' backwards-compatible special case (T5 v1.1 / Flan-T5)
    if act not in _ACTIVATIONS:
        raise ValueError(f"feed_forward_proj {spec!r}: unsupported activation {act!r} ({sorted(_ACTIVATIONS)})")
    return gated, act


@dataclasses.dataclass(frozen=True)
class T5Config:
    vocab_size: int
    d_model: int
    d_kv: int
    d_ff: int
    num_layers: int  # encoder depth
    num_heads: int
    num_decoder_layers: int | None = None  # None: same as num_layers
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "relu"  # "relu" (original T5) | "gated-gelu" (T5 v1.1, Flan-T5)
    tie_word_embeddings: bool = True  # head = shared embedding (original T5); False: separate lm_head
    scale_decoder_outputs: bool | None = None  # decoder output * d_model**-0.5; None: = tie_word_embeddings
    decoder_start_token_id: int = 0
    pad_token_id: int | None = 0
    eos_token_id: int | None = 1
    dtype: str = "float32"  # compute dtype; parameters are always fp32 masters
    remat: str = "none"  # layers.REMATS (True / False read as full / none): what a training layer keeps
    scan_layers: bool = True  # training and scoring layers in nn.scan; False: a Python loop (prefill scans)
    attention: str = "einsum"  # layers.ATTENTIONS: training, scoring and prefill attention

    def __post_init__(self):
        layers.check_attention(self.attention)
        object.__setattr__(self, "remat", layers.remat_name(self.remat))
        if self.num_decoder_layers is None:
            object.__setattr__(self, "num_decoder_layers", self.num_layers)
        if self.scale_decoder_outputs is None:  # one flag for both facts, as before transformers 5
            object.__setattr__(self, "scale_decoder_outputs", self.tie_word_embeddings)
        parse_feed_forward_proj(self.feed_forward_proj)

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    def replace(self, **changes) -> "T5Config":
        return dataclasses.replace(self, **changes)


def relative_position_bucket(
    relative_position: np.ndarray, bidirectional: bool, num_buckets: int, max_distance: int
) -> np.ndarray:
    """T5's bucketing of (key - query) offsets, on the host (shapes are static), as transformers does it.

    Half the buckets are exact small offsets, the rest logarithmically wider up to max_distance; a
    bidirectional (encoder) bias spends half its buckets on positive offsets, a causal (decoder) one
    only sees offsets <= 0.
    """
    rel = np.asarray(relative_position, np.int64)
    out = np.zeros_like(rel)
    if bidirectional:
        num_buckets //= 2
        out += (rel > 0).astype(np.int64) * num_buckets
        rel = np.abs(rel)
    else:
        rel = -np.minimum(rel, 0)
    max_exact = num_buckets // 2
    is_small = rel < max_exact
    safe = np.maximum(rel, 1).astype(np.float32)  # log(0) is never selected; avoid the warning
    large = max_exact + (
        np.log(safe / np.float32(max_exact))
        / np.float32(math.log(max_distance / max_exact))
        * np.float32(num_buckets - max_exact)
    ).astype(np.int64)
    large = np.minimum(large, num_buckets - 1)
    return (out + np.where(is_small, rel, large)).astype(np.int32)


def position_bias(table: jax.Array, buckets: jax.Array) -> jax.Array:
    """table [buckets, H] (fp32), buckets [B, T, S] -> additive bias [B, H, T, S] in fp32."""
    return jnp.moveaxis(jnp.take(table, buckets, axis=0), -1, 1)


class Attention(nn.Module):
    """Multi-head attention without scaling; bias (relative positions) and mask come from the stack."""

    config: T5Config
    dropout_rate: float = 0.0

    def setup(self):
        cfg = self.config
        d, h, hd = cfg.d_model, cfg.num_heads, cfg.d_kv
        self.dropout = dropout(self.dropout_rate)
        normal = nn.initializers.normal
        self.q = param_with_axes(self, "q", normal((d * hd) ** -0.5), (d, h, hd), ("embed", "heads", "head_dim"))
        self.k = param_with_axes(self, "k", normal(d**-0.5), (d, h, hd), ("embed", "heads", "head_dim"))
        self.v = param_with_axes(self, "v", normal(d**-0.5), (d, h, hd), ("embed", "heads", "head_dim"))
        self.o = param_with_axes(self, "o", normal((h * hd) ** -0.5), (h, hd, d), ("heads", "head_dim", "embed"))

    def project_kv(self, y):
        """[B, S, D] -> keys, values [B, S, H, Dh] in the compute dtype."""
        dt = self.config.compute_dtype
        k = jnp.einsum("bsd,dnh->bsnh", y, self.k.astype(dt))
        v = jnp.einsum("bsd,dnh->bsnh", y, self.v.astype(dt))
        return k, v

    def __call__(self, x, k, v, bias, mask):
        """x [B, T, D]; k, v [B, S, H, Dh]; bias [1|B, H, T, S] fp32 or None; mask bool [1|B, 1, 1|T, S]."""
        dt = self.config.compute_dtype
        q = jnp.einsum("btd,dnh->btnh", x, self.q.astype(dt))
        q = constrain(q, ("batch", "length", "act_heads", None))
        if self.config.attention == "fused" and self.dropout_rate == 0:
            out = layers.fused_attention(q, k.astype(dt), v.astype(dt), mask=mask, bias=bias, scale=1.0)
            out = constrain(out, ("batch", "length", "act_heads", None))
            return jnp.einsum("btnh,nhd->btd", out, self.o.astype(dt))
        scores = jnp.einsum("btnh,bsnh->bnts", q, k.astype(dt), preferred_element_type=jnp.float32)
        if bias is not None:
            scores = scores + bias
        scores = jnp.where(mask, scores, NEG_INF)
        probs = self.dropout(jax.nn.softmax(scores, axis=-1).astype(dt))
        out = jnp.einsum("bnts,bsnh->btnh", probs, v.astype(dt))
        out = constrain(out, ("batch", "length", "act_heads", None))
        return jnp.einsum("btnh,nhd->btd", out, self.o.astype(dt))


class MLP(nn.Module):
    config: T5Config
    dropout_rate: float = 0.0

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        dt = cfg.compute_dtype
        d, f = cfg.d_model, cfg.d_ff
        gated, act_name = parse_feed_forward_proj(cfg.feed_forward_proj)
        act = _ACTIVATIONS[act_name]
        w_in = lambda name: param_with_axes(self, name, nn.initializers.normal(d**-0.5), (d, f), ("embed", "mlp"))  # noqa: E731
        if gated:
            hidden = act(x @ w_in("wi_0").astype(dt)) * (x @ w_in("wi_1").astype(dt))
        else:
            hidden = act(x @ w_in("wi").astype(dt))
        hidden = constrain(dropout(self.dropout_rate)(hidden), ("batch", "length", "act_mlp"))
        wo = param_with_axes(self, "wo", nn.initializers.normal(f**-0.5), (f, d), ("mlp", "embed"))
        return hidden @ wo.astype(dt)


class EncoderLayer(nn.Module):
    config: T5Config
    dropout_rate: float = 0.0

    @nn.compact
    def __call__(self, x, bias, mask):
        cfg = self.config
        dt = cfg.compute_dtype
        rate = self.dropout_rate
        attn = Attention(cfg, rate, name="attn")
        h = RMSNorm(cfg.layer_norm_epsilon, dt, name="attn_norm")(x)
        k, v = attn.project_kv(h)
        x = x + dropout(rate)(attn(h, k, v, bias, mask))
        x = x + dropout(rate)(MLP(cfg, rate, name="mlp")(RMSNorm(cfg.layer_norm_epsilon, dt, name="mlp_norm")(x)))
        return constrain(x, ("batch", "length", "act_embed")), None


class DecoderLayer(nn.Module):
    config: T5Config
    dropout_rate: float = 0.0

    @nn.compact
    def __call__(self, x, self_bias, self_mask, enc, cross_mask, cache_index, cache, cross_kv):
        """Returns (x, (cache, new_cross_kv)); new_cross_kv is this layer's cross-attention keys/values
        when they were computed here from `enc` for a cached run (prefill), else None."""
        cfg = self.config
        dt = cfg.compute_dtype
        eps = cfg.layer_norm_epsilon
        rate = self.dropout_rate

        attn = Attention(cfg, rate, name="self_attn")
        h = RMSNorm(eps, dt, name="self_attn_norm")(x)
        k, v = attn.project_kv(h)
        if cache is not None:  # write this step's keys/values at cache_index, attend over the cache
            k, v = _write(cache["k"], k, cache_index), _write(cache["v"], v, cache_index)
            cache = {"k": k, "v": v}
        x = x + dropout(rate)(attn(h, k, v, self_bias, self_mask))

        cross = Attention(cfg, rate, name="cross_attn")
        new_cross_kv = None
        if cross_kv is None:
            ck, cv = cross.project_kv(enc)
            if cache is not None:
                new_cross_kv = {"k": ck, "v": cv}
        else:
            ck, cv = cross_kv["k"], cross_kv["v"]
        x = x + dropout(rate)(cross(RMSNorm(eps, dt, name="cross_attn_norm")(x), ck, cv, None, cross_mask))

        x = x + dropout(rate)(MLP(cfg, rate, name="mlp")(RMSNorm(eps, dt, name="mlp_norm")(x)))
        return constrain(x, ("batch", "length", "act_embed")), (cache, new_cross_kv)


def _write(cache, new, index):
    """new [B, T, H, Dh] into cache [B, S, H, Dh] from slot `index`: a scalar (prefill), or one slot
    per row [B] for a single decode token (rows of a continuous batch sit at different positions)."""
    if jnp.ndim(index) == 0:
        return jax.lax.dynamic_update_slice(cache, new.astype(cache.dtype), (0, index, 0, 0))
    return cache.at[jnp.arange(cache.shape[0]), index].set(new[:, 0].astype(cache.dtype), mode="drop")


def _scanned(layer_cls, config: T5Config, length: int, num_broadcast: int, num_sliced: int, name: str,
             dropout_rate: float):
    return nn.scan(
        layers.remat_layer(layer_cls, config.remat),
        variable_axes={"params": 0},
        split_rngs={"params": True, "dropout": True},
        in_axes=(nn.broadcast,) * num_broadcast + (0,) * num_sliced,
        length=length,
        metadata_params={nn.PARTITION_NAME: "layers"},
    )(config, dropout_rate, name=name)


def _relpos_table(module: nn.Module, cfg: T5Config):
    return param_with_axes(
        module, "relpos", nn.initializers.normal(cfg.d_model**-0.5),
        (cfg.relative_attention_num_buckets, cfg.num_heads), ("relpos_buckets", "heads"),
    )


class Encoder(nn.Module):
    config: T5Config
    dropout_rate: float = 0.0

    def setup(self):
        cfg = self.config
        self.relpos = _relpos_table(self, cfg)
        self.layers = _scanned(EncoderLayer, cfg, cfg.num_layers, 2, 0, "layers", self.dropout_rate)
        self.final_norm = RMSNorm(cfg.layer_norm_epsilon, cfg.compute_dtype)
        self.dropout = dropout(self.dropout_rate)  # stack input and output

    def __call__(self, x, mask):
        """x [B, S, D] embedded tokens; mask [B, S] bool (False at padding) -> [B, S, D]."""
        cfg = self.config
        pos = np.arange(x.shape[1])
        buckets = relative_position_bucket(
            pos[None, :] - pos[:, None], True, cfg.relative_attention_num_buckets, cfg.relative_attention_max_distance
        )
        bias = position_bias(self.relpos, jnp.asarray(buckets)[None])
        x, mask = self.dropout(x), mask[:, None, None, :]
        if cfg.scan_layers or self.is_initializing():
            x, _ = self.layers(x, bias, mask)
        else:
            layer = layers.remat_layer(EncoderLayer, cfg.remat, scanned=False)(cfg, self.dropout_rate, parent=None)
            x = layers.unrolled_layers(self, layer, x, bias, mask)
        return constrain(self.dropout(self.final_norm(x)), ("batch", "length", "act_embed"))


class Decoder(nn.Module):
    config: T5Config
    dropout_rate: float = 0.0

    def setup(self):
        cfg = self.config
        self.relpos = _relpos_table(self, cfg)
        self.layers = _scanned(DecoderLayer, cfg, cfg.num_decoder_layers, 5, 2, "layers", self.dropout_rate)
        self.final_norm = RMSNorm(cfg.layer_norm_epsilon, cfg.compute_dtype)
        self.dropout = dropout(self.dropout_rate)  # stack input and output

    def __call__(self, x, enc, enc_mask, cache=None, cache_index=None, cross_kv=None):
        """x [B, T, D] embedded decoder tokens; enc [B, S, D] (None when cross_kv is given); enc_mask [B, S].

        Without a cache: teacher forcing over T positions (causal). With a cache ({k, v} [L, B, S_dec,
        H, Dh] in prefill, a tuple of per-layer {k, v} [B, S_dec, H, Dh] when decoding): the T tokens
        sit at slots cache_index.. (a scalar, or per row [B] when decoding), attending to cache slots
        <= their own.
        Returns (hidden [B, T, D], cache, new_cross_kv).
        """
        cfg = self.config
        t = x.shape[1]
        if cache is None:
            q_pos = jnp.arange(t)[None]
            k_pos = jnp.arange(t)
            index = jnp.asarray(0, jnp.int32)
        else:
            index = jnp.asarray(cache_index, jnp.int32)
            q_pos = index.reshape(-1, 1) + jnp.arange(t)  # [1|B, T]
            slots = cache[0]["k"].shape[1] if isinstance(cache, tuple) else cache["k"].shape[2]
            k_pos = jnp.arange(slots)
        # Causal buckets depend only on the distance q - k >= 0: a host table over all distances.
        by_distance = jnp.asarray(
            relative_position_bucket(
                -np.arange(k_pos.shape[0]), False,
                cfg.relative_attention_num_buckets, cfg.relative_attention_max_distance,
            )
        )
        distance = jnp.clip(q_pos[:, :, None] - k_pos, 0, by_distance.shape[0] - 1)  # [1|B, T, S]
        bias = position_bias(self.relpos, by_distance[distance])
        self_mask = (k_pos <= q_pos[:, :, None])[:, None]
        cross_mask = enc_mask.astype(bool)[:, None, None, :]
        if isinstance(cache, tuple):  # decoding: one cache and cross-kv buffer per layer, layers unrolled
            x, cache = self._unrolled(x, bias, self_mask, cross_mask, index, cache, cross_kv)
            return constrain(self.final_norm(x), ("batch", "length", "act_embed")), cache, None
        if cache is None and not (cfg.scan_layers or self.is_initializing()):  # teacher forcing, unrolled
            layer = layers.remat_layer(DecoderLayer, cfg.remat, scanned=False)(cfg, self.dropout_rate, parent=None)
            x = layers.unrolled_layers(self, layer, self.dropout(x), bias, self_mask, enc, cross_mask, index, None, None)
            return constrain(self.dropout(self.final_norm(x)), ("batch", "length", "act_embed")), None, None
        x, (cache, new_cross_kv) = self.layers(self.dropout(x), bias, self_mask, enc, cross_mask, index, cache, cross_kv)
        return constrain(self.dropout(self.final_norm(x)), ("batch", "length", "act_embed")), cache, new_cross_kv

    def _unrolled(self, x, bias, self_mask, cross_mask, index, cache, cross_kv):
        """Per-layer params (the `decode_layout` split, else slices of the stacked ones) and per-layer
        caches: a scanned decode step would copy each layer's weights and caches out of the stacked
        buffers (see the Llama decode_step)."""
        stacked = self.variables["params"]["layers"]
        layer = DecoderLayer(self.config, parent=None)
        new_cache = []
        for i, (layer_cache, layer_cross) in enumerate(zip(cache, cross_kv)):
            x, (layer_cache, _) = layer.apply({"params": layers.layer_params(stacked, i)}, x, bias, self_mask, None,
                                              cross_mask, index, layer_cache, layer_cross)
            new_cache.append(layer_cache)
        return x, tuple(new_cache)


class T5(nn.Module):
    config: T5Config
    dropout_rate: float = 0.0  # training only (see the module doc)

    FP32_PARAMS = ("relpos",)  # relative-position bias tables: the bias is added to fp32 scores

    def setup(self):
        cfg = self.config
        self.embed = param_with_axes(
            self, "embed", nn.initializers.normal(1.0), (cfg.vocab_size, cfg.d_model), ("vocab", "embed")
        )
        self.encoder = Encoder(cfg, self.dropout_rate)
        self.decoder = Decoder(cfg, self.dropout_rate)
        if not cfg.tie_word_embeddings:
            self.lm_head = param_with_axes(
                self, "lm_head", nn.initializers.normal(cfg.d_model**-0.5), (cfg.d_model, cfg.vocab_size),
                ("embed", "vocab"),
            )

    # -- core -------------------------------------------------------------------------------------
    def embed_tokens(self, tokens):
        x = jnp.take(self.embed, tokens, axis=0).astype(self.config.compute_dtype)
        return constrain(x, ("batch", "length", "act_embed"))

    def encode(self, tokens, mask):
        """[B, S] tokens and validity -> encoder output [B, S, D]."""
        return self.encoder(self.embed_tokens(tokens), mask.astype(bool))

    def logits(self, hidden):
        cfg = self.config
        dt = cfg.compute_dtype
        if cfg.scale_decoder_outputs:
            hidden = hidden * jnp.asarray(cfg.d_model**-0.5, dt)
        head = self.embed.T if cfg.tie_word_embeddings else self.lm_head
        return constrain(hidden @ head.astype(dt), ("batch", "length", "act_vocab"))

    def _start_tokens(self, batch: int, dtype=jnp.int32):
        return jnp.full((batch, 1), self.config.decoder_start_token_id, dtype)

    def __call__(self, input_ids, attention_mask=None, decoder_input_ids=None):
        """Teacher-forced logits [B, T, V] (decoder_input_ids default: the start token alone)."""
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, bool)
        if decoder_input_ids is None:
            decoder_input_ids = self._start_tokens(input_ids.shape[0], input_ids.dtype)
        mask = attention_mask.astype(bool)
        enc = self.encode(input_ids, mask)
        hidden, _, _ = self.decoder(self.embed_tokens(decoder_input_ids), enc, mask)
        return self.logits(hidden)

    # -- family interface ---------------------------------------------------------------------------
    def completion_logits(self, prompt, prompt_mask, completion, completion_mask):
        """Logits predicting each completion token: [B, C, V]. Prompt left-padded, completion right-padded.

        Causality alone keeps padding after a completion from influencing its real tokens, so
        completion_mask is not needed here (callers mask the per-token log-probs).
        """
        mask = prompt_mask.astype(bool)
        enc = self.encode(prompt, mask)
        decoder_input = jnp.concatenate([self._start_tokens(completion.shape[0], completion.dtype), completion[:, :-1]], 1)
        hidden, _, _ = self.decoder(self.embed_tokens(decoder_input), enc, mask)
        return self.logits(hidden)

    def init_cache(self, batch: int, length: int):
        cfg = self.config
        shape = (cfg.num_decoder_layers, batch, length, cfg.num_heads, cfg.d_kv)
        return {"k": jnp.zeros(shape, cfg.compute_dtype), "v": jnp.zeros(shape, cfg.compute_dtype)}

    def prefill(self, prompt, prompt_mask, max_new_tokens: int, num_samples: int = 1):
        """Encodes once, runs the decoder on the start token (slot 0), then expands to B * num_samples rows.

        state: cache, a tuple of per-layer {k, v} [B*n, max_new_tokens + 1, H, Dh]; cross_kv, a tuple of
        per-layer {k, v} [B*n, S, H, Dh]; enc_mask [B*n, S] bool; index [B*n] int32 (the slot each row's
        next decode_step token goes to: rows of a continuous batch differ).
        """
        b = prompt.shape[0]
        mask = prompt_mask.astype(bool)
        enc = self.encode(prompt, mask)
        cache = self.init_cache(b, max_new_tokens + 1)
        hidden, cache, cross_kv = self.decoder(
            self.embed_tokens(self._start_tokens(b, prompt.dtype)), enc, mask, cache, jnp.asarray(0, jnp.int32)
        )
        logits = self.logits(hidden)[:, 0]

        def per_layer(kv):
            return tuple({"k": kv["k"][i], "v": kv["v"][i]} for i in range(self.config.num_decoder_layers))

        state = {
            "cache": layers.repeat_batch(per_layer(cache), num_samples),
            "cross_kv": layers.repeat_batch(per_layer(cross_kv), num_samples),
            "enc_mask": layers.repeat_batch(mask, num_samples),
            "index": jnp.ones((b * num_samples,), jnp.int32),  # per row: the slot its next token goes to
        }
        return layers.repeat_batch(logits, num_samples), state

    def decode_step(self, tokens, state):
        index = state["index"]
        hidden, cache, _ = self.decoder(
            self.embed_tokens(tokens[:, None]), None, state["enc_mask"], state["cache"], index, state["cross_kv"]
        )
        new_state = {"cache": cache, "cross_kv": state["cross_kv"], "enc_mask": state["enc_mask"], "index": index + 1}
        return self.logits(hidden)[:, 0], new_state

    @staticmethod
    def decode_layout(params, compute_dtype):
        """The decoder's stacked layer params split into one buffer per layer and the matrices in
        the compute dtype (made once per sampling call, outside the decode loop); see
        `Decoder._unrolled`. The relative-position tables stay fp32: the bias is added in fp32."""
        decoder = {**params["decoder"], "layers": layers.split_layers(params["decoder"]["layers"])}
        return layers.cast_matrices({**params, "decoder": decoder}, compute_dtype, keep=T5.FP32_PARAMS)


def make_module(config: T5Config) -> T5:
    return T5(config)


def init_params(config: T5Config, rng: jax.Array) -> Any:
    """Random boxed params (LogicallyPartitioned leaves); `nn.unbox` strips the axis metadata."""
    tokens = jnp.zeros((1, 2), jnp.int32)
    return T5(config).init(rng, tokens, jnp.ones((1, 2), jnp.int32), tokens)["params"]


CONFIG_CLASS = T5Config
