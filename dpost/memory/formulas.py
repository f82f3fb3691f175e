"""Memory formulas: per-device bytes of each term of a stage, from the model's widths.

Notation (all per device): a = bytes of the compute dtype (2 for bfloat16, 4 for float32);
b = sequences per device in one micro-batch (global batch / grad_accum / batch shards, where the
batch shards are the mesh axes the `batch` rule maps to, data x fsdp by default; DPO counts chosen
and rejected, so b = 2 x pairs); T = tokens per sequence (decoder-only: prompt + target; T5:
P = prompt to the encoder, C = target to the decoder); C = target tokens (the positions that reach the
vocabulary head); d = hidden size; H, K = query and KV heads per device (divided by the `tensor`
shards when it divides them); Dh = head dim; F = MLP width per device; V = vocabulary per device;
L = layers. N = b * T tokens.

Terms:
  params        fp32 master parameters; each leaf's shard is its shape divided by the mesh axes its
                logical axes map to (`sharding.param_shardings`, non-dividing axes dropped).
  grads         fp32, sharded like the params; x2 when grad_accum > 1 (accumulator + micro-batch).
  adam          AdamW first and second moments: 2 x params, or 1.5 x params with
                `<stage>.optimizer.moments_dtype=bfloat16` (the first moment in bf16; the second
                stays fp32).
  ref params    DPO with `dpo.reference=in_step` keeps the reference model's fp32 params.
  weight copies training: in bf16 the per-step cast of this device's shards (params x a/4);
                sampling: the decode copy of the params (split per layer, in the compute dtype:
                params x a/4, in fp32 too). Plus, under fsdp, the all-gathered layer weights: every
                layer's (L layers + head) kept for the backward pass without remat; two layers +
                the head with remat or when sampling.
  activations   training, per layer kept for the backward pass (residuals R):
                  decoder-only layer:  R = N*a*(5d + 3*H*Dh + 2*K*Dh + 6F) + b*H*T*T*(4 + a)
                  T5 encoder layer:    R = N*a*(5d + 5*H*Dh + 8F) + b*H*P*P*(4 + a)
                  T5 decoder layer:    R = N*a*(7d + 6*H*Dh + 8F) + b*P*a*2*H*Dh + b*H*C*(C + P)*(4 + a)
                (the attention scores are fp32: the softmax output is kept in fp32 plus the probs in
                the compute dtype; the MLP keeps gate, up, activation and product), the logits'
                working set G = b*C*V*(8 + a') (fp32 logits + their gradient, a' = a when the compute
                dtype is not fp32; C = model.logits_chunk when a decoder-only head is chunked), and the
                layer input X = N*d*a. By `model.remat`:
                  none:  sum(R over layers) + max(R, G)             (+ one layer's backward)
                  full:  sum(X over layers) + max(1.5 R, G)         (one layer recomputed)
                  dots:  sum(X + D over layers) + max(1.5 R, G)     (the recomputation counted as full's:
                         an upper bound, 34% over the compiled arith_tiny SFT step on CPU)
                where D are the weight-matmul outputs the dots policy keeps (attention scores are
                recomputed), in the compute dtype:
                  decoder-only layer:  D = N*a*(2d + H*Dh + 2*K*Dh + 2F)
                  T5 encoder layer:    D = N*a*(2d + 3*H*Dh + 2F)
                  T5 decoder layer:    D = N*a*(3d + 4*H*Dh + 2F) + b*P*a*2*H*Dh
                (2F: the gated MLP's two input projections; a relu T5 keeps one, so F is over-counted).
                `model.scan_layers=False` (a Python loop over the layers) is planned as the scan:
                the same residuals are kept either way.
                The coefficients are counted from XLA's buffer assignment of the compiled train
                step (tests/memory/test_plan.py checks the total within 20% of `memory_analysis()`);
                accelerator compilers fuse more, so treat them as the upper end.
                DPO with the reference in the step also runs the reference forward over the whole
                (not micro-) batch first: its working set (below) enters as a max.
  kv cache      sampling: L x rows x (prompt + new tokens) x K x Dh x 2 (k and v) x a, rows =
                prompts per device x num_samples, prompts = sampling.<stage>.batch_size // num_samples
                (the driver's batch sizes count sequences) over the batch shards, prompt = the
                sampler's power-of-two bucket of data.max_prompt_len (T5: decoder self-attention
                over new tokens + 1 and cross-attention keys/values over the prompt, H heads).
  activations   sampling: max(prefill, decode). Prefill = one layer's forward working set
                  N*a*(2d + 2*H*Dh + 2*K*Dh + 3F) + b*H*Tq*Tk*4
                over the prompts, plus the cache before its expansion to num_samples rows.
                Decode = the self-attention cache once more (the scanned layers write a new cache
                while the old one is still read) + two layers' slices of the whole cache + the fp32
                logits of every row (3 x rows x V x 4), as in XLA's buffer assignment of the compiled
                decode loop.
Total = sum of the terms; it fits when total <= device memory. Device memory: --device_memory_gb, else
`jax.devices()[0].memory_stats()["bytes_limit"]`, else (CPU) host RAM / local device count.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Shape:
    """Per-device model widths for the activation formulas."""

    a: int  # bytes of the compute dtype
    d: int
    f: int  # MLP width per device
    h: int  # query heads per device
    k: int  # KV heads per device
    dh: int
    v: int  # vocabulary per device
    layers: int
    dec_layers: int  # T5 decoder layers (0 for decoder-only)


def decoder_layer_residuals(s: Shape, b: int, t: int) -> int:
    """Decoder-only layer: bytes kept for the backward pass."""
    n = b * t
    return n * s.a * (5 * s.d + 3 * s.h * s.dh + 2 * s.k * s.dh + 6 * s.f) + b * s.h * t * t * (4 + s.a)


def t5_encoder_layer_residuals(s: Shape, b: int, p: int) -> int:
    n = b * p
    return n * s.a * (5 * s.d + 5 * s.h * s.dh + 8 * s.f) + b * s.h * p * p * (4 + s.a)


def t5_decoder_layer_residuals(s: Shape, b: int, p: int, c: int) -> int:
    n = b * c
    return (n * s.a * (7 * s.d + 6 * s.h * s.dh + 8 * s.f) + b * p * s.a * 2 * s.h * s.dh
            + b * s.h * c * (c + p) * (4 + s.a))


def decoder_layer_dots(s: Shape, b: int, t: int) -> int:
    """Decoder-only layer: weight-matmul outputs (q, k, v, o, gate, up, down) kept by remat=dots."""
    return b * t * s.a * (2 * s.d + s.h * s.dh + 2 * s.k * s.dh + 2 * s.f)


def t5_encoder_layer_dots(s: Shape, b: int, p: int) -> int:
    return b * p * s.a * (2 * s.d + 3 * s.h * s.dh + 2 * s.f)


def t5_decoder_layer_dots(s: Shape, b: int, p: int, c: int) -> int:
    return b * c * s.a * (3 * s.d + 4 * s.h * s.dh + 2 * s.f) + b * p * s.a * 2 * s.h * s.dh


def forward_working_set(s: Shape, b: int, t_q: int, t_k: int) -> int:
    """One layer's forward pass with nothing kept (inference, the in-step reference, prefill)."""
    n = b * t_q
    return n * s.a * (2 * s.d + 2 * s.h * s.dh + 2 * s.k * s.dh + 3 * s.f) + b * s.h * t_q * t_k * 4


def logits_working_set(s: Shape, b: int, c: int) -> int:
    """fp32 logits over the target positions and their gradient (+ the compute-dtype copy)."""
    return b * c * s.v * (8 + (s.a if s.a != 4 else 0))


def training_activations(family: str, s: Shape, b: int, p: int, c: int, remat: str, logits_chunk: int = 0) -> int:
    """Peak activation bytes of one forward + backward over b sequences (prompt p, target c tokens)
    under the remat policy (none | full | dots); decoder-only models with `logits_chunk` hold the
    head's logits for that many positions at once."""
    g = logits_working_set(s, b, min(c, logits_chunk) if family == "llama" and logits_chunk else c)
    if family == "llama":
        t = p + c
        r = decoder_layer_residuals(s, b, t)
        if remat == "none":
            return s.layers * r + max(r, g)
        kept = b * t * s.d * s.a + (decoder_layer_dots(s, b, t) if remat == "dots" else 0)
        return s.layers * kept + max(int(1.5 * r), g)
    r_enc = t5_encoder_layer_residuals(s, b, p)
    r_dec = t5_decoder_layer_residuals(s, b, p, c)
    r_max = max(r_enc, r_dec)
    if remat == "none":
        return s.layers * r_enc + s.dec_layers * r_dec + max(r_max, g)
    kept = s.layers * b * p * s.d * s.a + s.dec_layers * b * c * s.d * s.a + b * p * s.d * s.a
    if remat == "dots":
        kept += s.layers * t5_encoder_layer_dots(s, b, p) + s.dec_layers * t5_decoder_layer_dots(s, b, p, c)
    return kept + max(int(1.5 * r_max), g)


def inference_activations(family: str, s: Shape, b: int, p: int, c: int) -> int:
    """Forward only (the in-step DPO reference): one layer's working set or the logits."""
    if family == "llama":
        ws = forward_working_set(s, b, p + c, p + c)
    else:
        ws = max(forward_working_set(s, b, p, p), forward_working_set(s, b, c, c + p)) + b * p * s.d * s.a
    return max(ws, b * c * s.v * 4 * 2)


def kv_cache_bytes(family: str, s: Shape, rows: int, p: int, m: int) -> int:
    if family == "llama":
        return s.layers * rows * (p + m) * s.k * s.dh * 2 * s.a
    return s.dec_layers * rows * ((m + 1) + p) * s.h * s.dh * 2 * s.a


def sampling_activations(family: str, s: Shape, prompts: int, n: int, p: int, m: int) -> tuple[int, int]:
    """(prefill, decode) working sets besides the expanded KV cache itself."""
    rows = prompts * n
    cache = kv_cache_bytes(family, s, rows, p, m)
    if family == "llama":
        prefill = forward_working_set(s, prompts, p, p + m) + cache // n + prompts * s.v * 4
    else:
        prefill = forward_working_set(s, prompts, p, p) + cache // n + prompts * p * s.d * s.a
    if family == "llama":
        self_cache, layers = cache, s.layers
    else:
        self_cache, layers = s.dec_layers * rows * (m + 1) * s.h * s.dh * 2 * s.a, s.dec_layers
    decode = self_cache + 2 * (cache // max(1, layers)) + 3 * rows * s.v * 4
    return prefill, decode
