"""Memory planner: per-device bytes of every DPO-ST stage, before anything is allocated.

    python -m dpost.plan --config configs/llama2_7b.py [--mesh data=1,fsdp=8,tensor=1] \
        [--device_memory_gb 80] [--num_devices 16] [--check]

Prints one row per stage (warm-up/iteration SFT, DPO with the reference in the step or precomputed,
sampling for pairs / pseudo-labels / evaluation) with the per-device bytes of each term, the total
and whether it fits the device. `plan(config, mesh_shape, device_memory_bytes)` returns the same
figures as a `Plan`; `check_fits(plan)` raises `ValueError` naming the stage and its largest term
(the driver calls it before the first stage).

Model shapes come without downloading or allocating anything: `scratch` models from
`config.model.scratch`, `hf:<local dir>` from its config.json, `gguf:<file>` from the GGUF metadata,
`orbax:<dir>` from dpost_model.json, and hub ids from `KNOWN_HF_CONFIGS` (or the local HF cache).
Parameter shapes and logical axes come from `models.sources.abstract_params` (jax.eval_shape of the
family's init), shardings from `sharding.param_shardings` on an abstract mesh of the requested shape,
so the planner runs on a laptop for any pod size.

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
  adam          AdamW first and second moments: 2 x params.
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
                layer input X = N*d*a:
                  without remat:  sum(R over layers) + max(R, G)        (+ one layer's backward)
                  with remat:     sum(X over layers) + max(1.5 R, G)    (one layer recomputed)
                The coefficients are counted from XLA's buffer assignment of the compiled train
                step (tests/test_plan.py checks the total within 20% of `memory_analysis()`);
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
import json
import math
import os
import sys
from typing import Any, Mapping

GiB = 1024**3

# config.json dicts of checkpoints users name by hub id (public numbers; offline planning).
KNOWN_HF_CONFIGS: dict[str, dict] = {
    "google/flan-t5-small": dict(
        architectures=["T5ForConditionalGeneration"], model_type="t5", vocab_size=32128, d_model=512, d_kv=64,
        d_ff=1024, num_layers=8, num_decoder_layers=8, num_heads=6, relative_attention_num_buckets=32,
        relative_attention_max_distance=128, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
        layer_norm_epsilon=1e-6, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
    ),
    "google/flan-t5-base": dict(
        architectures=["T5ForConditionalGeneration"], model_type="t5", vocab_size=32128, d_model=768, d_kv=64,
        d_ff=2048, num_layers=12, num_decoder_layers=12, num_heads=12, relative_attention_num_buckets=32,
        relative_attention_max_distance=128, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
        layer_norm_epsilon=1e-6, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
    ),
    "google/flan-t5-large": dict(
        architectures=["T5ForConditionalGeneration"], model_type="t5", vocab_size=32128, d_model=1024, d_kv=64,
        d_ff=2816, num_layers=24, num_decoder_layers=24, num_heads=16, relative_attention_num_buckets=32,
        relative_attention_max_distance=128, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
        layer_norm_epsilon=1e-6, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
    ),
    "meta-llama/Llama-2-7b-hf": dict(
        architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=32000, hidden_size=4096,
        intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
        max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2,
    ),
    "meta-llama/Llama-2-13b-hf": dict(
        architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=32000, hidden_size=5120,
        intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40, num_key_value_heads=40,
        max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2,
    ),
    "TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T": dict(
        architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=32000, hidden_size=2048,
        intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
        max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2,
    ),
    "HuggingFaceTB/SmolLM2-135M-Instruct": dict(
        architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=49152, hidden_size=576,
        intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
        max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=2,
    ),
}
KNOWN_HF_CONFIGS["TinyLlama/TinyLlama-1.1B-Chat-v1.0"] = KNOWN_HF_CONFIGS[
    "TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T"
]
# GGUF files named in configs but not present here (e.g. configs/smollm2_gsm8k.py without the package).
KNOWN_GGUF_FILES = {"SmolLM2-135M-Instruct": "HuggingFaceTB/SmolLM2-135M-Instruct"}


# --------------------------------------------------------------------------------------------------
# model shapes
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ModelSpec:
    family: str  # "llama" | "t5"
    config: Any  # LlamaConfig | T5Config (dtype and remat from config.model)
    source: str  # config.model.source
    origin: str  # where the shapes were read from


def _known_hf(name: str) -> dict | None:
    lowered = {k.lower(): v for k, v in KNOWN_HF_CONFIGS.items()}
    return lowered.get(name.strip("/").lower())


def _hf_cached_config(repo_id: str) -> dict | None:
    """config.json from the local Hugging Face cache (never the network)."""
    try:
        from huggingface_hub import hf_hub_download

        path = hf_hub_download(repo_id, "config.json", local_files_only=True)
    except Exception:  # noqa: BLE001 - not cached / not a valid repo id
        return None
    with open(path) as f:
        return json.load(f)


def _gguf_config(path: str):
    import gguf

    from dpost.models.llama import params as llama_params

    reader = gguf.GGUFReader(path)
    meta = {}
    for key, field in reader.fields.items():
        if key.startswith("tokenizer.ggml.") and key != "tokenizer.ggml.tokens" and "token_id" not in key:
            continue
        if key == "tokenizer.ggml.tokens":
            meta.setdefault("llama.vocab_size", len(field.data))
            continue
        try:
            meta[key] = field.contents()
        except Exception:  # noqa: BLE001 - unreadable metadata is not needed for shapes
            continue
    if meta.get("general.architecture") != "llama":
        raise ValueError(f"gguf:{path}: unsupported GGUF architecture {meta.get('general.architecture')!r}")
    meta["_has_output_weight"] = any(t.name == "output.weight" for t in reader.tensors)
    return llama_params.config_from_gguf(meta)


def _scratch_config(family_name: str, scratch: Mapping[str, Any]):
    from dpost.models.registry import get_family

    cls = get_family(family_name).config_class()
    fields = {f.name for f in dataclasses.fields(cls)}
    values = dict(scratch)
    if "vocab_size" not in values and "tokenizer_vocab_size" in values:
        values["vocab_size"] = values["tokenizer_vocab_size"]
    return cls(**{k: v for k, v in values.items() if k in fields})


def resolve_model(config) -> ModelSpec:
    """Family and family config (shapes only) of `config.model`, without loading weights."""
    from dpost.models.registry import family_for_hf_config, get_family

    m = config.model
    source = str(m.source)
    if source in ("scratch", "pretrain"):
        if not m.family:
            raise ValueError(f"model.source={source} needs model.family (llama | t5)")
        cfg, family, origin = _scratch_config(m.family, m.scratch), m.family, "config.model.scratch"
    else:
        scheme, _, location = source.partition(":")
        if scheme == "hf":
            if os.path.isdir(location):
                with open(os.path.join(location, "config.json")) as f:
                    hf, origin = json.load(f), os.path.join(location, "config.json")
            else:
                hf, origin = _known_hf(location), "dpost.plan.KNOWN_HF_CONFIGS"
                if hf is None:
                    hf, origin = _hf_cached_config(location), "Hugging Face cache"
                if hf is None:
                    raise ValueError(
                        f"{source}: not a local directory and no known shapes for {location!r}; "
                        f"known hub ids: {', '.join(sorted(KNOWN_HF_CONFIGS))} "
                        "(or point hf: at a folder with config.json)"
                    )
            fam = family_for_hf_config(hf, source)
            cfg, family = fam.config_from_hf(hf), fam.name
        elif scheme == "gguf":
            if os.path.isfile(location):
                cfg, family, origin = _gguf_config(location), "llama", "GGUF metadata"
            else:
                stem = os.path.splitext(os.path.basename(location.split(" ")[0]))[0]
                known = next((v for k, v in KNOWN_GGUF_FILES.items() if stem.startswith(k)), None)
                if known is None:
                    raise ValueError(f"{source}: no such GGUF file and no known shapes for {stem!r}")
                cfg = get_family("llama").config_from_hf(KNOWN_HF_CONFIGS[known])
                family, origin = "llama", f"dpost.plan.KNOWN_HF_CONFIGS[{known!r}] (file not found)"
        elif scheme == "orbax":
            from etils import epath

            from dpost.models.sources import MODEL_INFO_FILE

            info = json.loads((epath.Path(location) / MODEL_INFO_FILE).read_text())
            family = info["family"]
            cfg = get_family(family).config_class()(**info["config"])
            origin = MODEL_INFO_FILE
        else:
            raise ValueError(f"model source {source!r}: expected scratch, hf:<...>, gguf:<...> or orbax:<...>")
    dtype = str(m.dtype) if m.dtype else "float32"
    cfg = dataclasses.replace(cfg, dtype=dtype, remat=bool(m.remat))
    return ModelSpec(family, cfg, source, origin)


def _dims(family: str, cfg) -> dict:
    """Family-neutral shape numbers."""
    if family == "llama":
        return dict(d=cfg.hidden_size, f=cfg.intermediate_size, heads=cfg.num_heads, kv_heads=cfg.num_kv_heads,
                    head_dim=cfg.head_dim, vocab=cfg.vocab_size, layers=cfg.num_layers, dec_layers=0)
    return dict(d=cfg.d_model, f=cfg.d_ff, heads=cfg.num_heads, kv_heads=cfg.num_heads, head_dim=cfg.d_kv,
                vocab=cfg.vocab_size, layers=cfg.num_layers, dec_layers=cfg.num_decoder_layers)


# --------------------------------------------------------------------------------------------------
# mesh and parameter shards
# --------------------------------------------------------------------------------------------------
def resolve_mesh(mesh_shape: Mapping[str, int] | None, num_devices: int | None = None) -> dict[str, int]:
    """{data, fsdp, tensor} with at most one -1 resolved against num_devices (default jax.device_count())."""
    from dpost.sharding import MESH_AXES

    shape = dict(mesh_shape or {"data": -1})
    unknown = set(shape) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"unknown mesh axes {sorted(unknown)}; expected a subset of {MESH_AXES}")
    sizes = {axis: int(shape.get(axis, 1)) for axis in MESH_AXES}
    free = [a for a, s in sizes.items() if s == -1]
    if len(free) > 1:
        raise ValueError(f"mesh {shape}: at most one axis may be -1")
    if free:
        if num_devices is None:
            import jax

            num_devices = jax.device_count()
        known = math.prod(s for s in sizes.values() if s != -1)
        if num_devices % known:
            raise ValueError(f"mesh {shape}: {num_devices} devices are not divisible by {known}")
        sizes[free[0]] = num_devices // known
    if any(s < 1 for s in sizes.values()):
        raise ValueError(f"mesh {shape}: sizes must be positive")
    return sizes


def _abstract_mesh(sizes: Mapping[str, int]):
    from jax.sharding import AbstractMesh

    from dpost.sharding import MESH_AXES

    return AbstractMesh(tuple(int(sizes[a]) for a in MESH_AXES), MESH_AXES)


def _shards(logical: str, dim: int, sizes: Mapping[str, int], rules) -> int:
    """How many ways a dimension of size `dim` with logical name `logical` is split on this mesh."""
    from dpost import sharding

    s = sharding.logical_to_sharding((logical,), (dim,), _abstract_mesh(sizes), rules)
    return dim // s.shard_shape((dim,))[0]


@dataclasses.dataclass(frozen=True)
class ParamInfo:
    count: int  # parameters
    bytes_fp32: int  # whole model, fp32
    per_device: int  # fp32 bytes of this device's shards
    layer_gathered: dict  # stack name -> fp32 bytes of one layer after the fsdp all-gather (per device)
    layers_gathered: int  # all scanned layers after the fsdp all-gather (per device)
    rest_gathered: int  # non-layer params (embedding, head, norms) after the fsdp all-gather


def param_info(spec: ModelSpec, sizes: Mapping[str, int], rules=None) -> ParamInfo:
    """Per-device parameter bytes from each leaf's PartitionSpec on a mesh of `sizes`."""
    import flax.linen as nn
    import jax
    from dpost import sharding
    from dpost.models import sources
    from dpost.models.registry import get_family

    rules = sharding.rules_from_config(rules)
    boxed = sources.abstract_params(get_family(spec.family), spec.config)
    shapes = nn.unbox(boxed)
    names = nn.get_partition_spec(boxed)
    mesh = _abstract_mesh(sizes)
    gathered_mesh = _abstract_mesh({**sizes, "fsdp": 1, "data": 1})
    leaves = jax.tree_util.tree_flatten_with_path(shapes)[0]
    specs = jax.tree.leaves(names, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    count = per_device = rest = layers_total = 0
    layer: dict[str, int] = {}
    for (path, x), spec_names in zip(leaves, specs, strict=True):
        key = tuple(str(getattr(k, "key", k)) for k in path)
        axes = tuple(spec_names)
        count += math.prod(x.shape)
        shard = sharding.logical_to_sharding(axes, x.shape, mesh, rules).shard_shape(x.shape)
        per_device += math.prod(shard) * 4
        full = math.prod(sharding.logical_to_sharding(axes, x.shape, gathered_mesh, rules).shard_shape(x.shape)) * 4
        if "layers" in axes:
            stack = "/".join(str(k) for k in key[: key.index("layers")]) if "layers" in key else "layers"
            layer[stack or "layers"] = layer.get(stack or "layers", 0) + full // x.shape[axes.index("layers")]
            layers_total += full
        else:
            rest += full
    return ParamInfo(count, count * 4, per_device, layer, layers_total, rest)


# --------------------------------------------------------------------------------------------------
# activation formulas (see the module docstring)
# --------------------------------------------------------------------------------------------------
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


def forward_working_set(s: Shape, b: int, t_q: int, t_k: int) -> int:
    """One layer's forward pass with nothing kept (inference, the in-step reference, prefill)."""
    n = b * t_q
    return n * s.a * (2 * s.d + 2 * s.h * s.dh + 2 * s.k * s.dh + 3 * s.f) + b * s.h * t_q * t_k * 4


def logits_working_set(s: Shape, b: int, c: int) -> int:
    """fp32 logits over the target positions and their gradient (+ the compute-dtype copy)."""
    return b * c * s.v * (8 + (s.a if s.a != 4 else 0))


def training_activations(family: str, s: Shape, b: int, p: int, c: int, remat: bool, logits_chunk: int = 0) -> int:
    """Peak activation bytes of one forward + backward over b sequences (prompt p, target c tokens);
    decoder-only models with `logits_chunk` hold the head's logits for that many positions at once."""
    g = logits_working_set(s, b, min(c, logits_chunk) if family == "llama" and logits_chunk else c)
    if family == "llama":
        t = p + c
        r = decoder_layer_residuals(s, b, t)
        if remat:
            return s.layers * b * t * s.d * s.a + max(int(1.5 * r), g)
        return s.layers * r + max(r, g)
    r_enc = t5_encoder_layer_residuals(s, b, p)
    r_dec = t5_decoder_layer_residuals(s, b, p, c)
    r_max = max(r_enc, r_dec)
    if remat:
        kept = s.layers * b * p * s.d * s.a + s.dec_layers * b * c * s.d * s.a + b * p * s.d * s.a
        return kept + max(int(1.5 * r_max), g)
    return s.layers * r_enc + s.dec_layers * r_dec + max(r_max, g)


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


# --------------------------------------------------------------------------------------------------
# the plan
# --------------------------------------------------------------------------------------------------
HINTS = {
    "params": "shard the parameters over more devices (a larger mesh fsdp axis) or add tensor parallelism",
    "grads": "shard over more devices (mesh fsdp) or use grad_accum=1 (accumulation keeps a second gradient copy)",
    "adam": "shard the optimizer state over more devices (a larger mesh fsdp axis)",
    "ref params": "use dpo.reference=precomputed (reference log-probs scored once, no reference weights in the step)",
    "weight copies": "set model.remat=True (only two layers' all-gathered copies live at once)",
    "activations": "set model.remat=True, model.logits_chunk (decoder-only), raise {stage}.grad_accum, or spread "
                   "the batch over more devices (mesh data/fsdp)",
    "kv cache": "lower sampling.{stage}.batch_size (or num_samples / max_new_tokens), or shard KV heads (mesh tensor)",
}
SAMPLING_HINTS = {
    "activations": "lower sampling.{stage}.batch_size, or spread the prompts over more devices (mesh data/fsdp)",
    "weight copies": "shard the weights over a tensor axis (mesh tensor)",
}


@dataclasses.dataclass
class StageRow:
    stage: str  # sft | dpo (ref in_step) | dpo (ref precomputed) | sample pairs | sample labels | sample eval
    used: bool  # whether a run of this config executes the stage (method, dpo.reference)
    batch: str  # what one device processes, in words
    terms: dict  # term name -> bytes per device (summed into total)
    activations_remat: int | None = None  # training rows: both alternatives, for the table
    activations_no_remat: int | None = None
    notes: dict = dataclasses.field(default_factory=dict)  # term name -> how it was computed

    @property
    def total(self) -> int:
        return int(sum(self.terms.values()))

    def largest(self) -> tuple[str, int]:
        name = max(self.terms, key=lambda k: self.terms[k])
        return name, int(self.terms[name])


@dataclasses.dataclass
class Plan:
    config_name: str
    family: str
    source: str
    origin: str  # where the model's shapes came from
    model_config: Any
    dtype: str
    remat: bool
    mesh: dict  # {data, fsdp, tensor}
    num_devices: int
    param_count: int
    param_bytes: int  # whole model, fp32
    device_memory_bytes: int | None
    device_memory_source: str
    stages: list
    warnings: list = dataclasses.field(default_factory=list)

    def stage(self, name: str) -> StageRow:
        for row in self.stages:
            if row.stage == name:
                return row
        raise KeyError(f"no stage {name!r}; stages: {[r.stage for r in self.stages]}")

    def fits(self, row: StageRow) -> bool:
        return self.device_memory_bytes is None or row.total <= self.device_memory_bytes

    def over_budget(self) -> list:
        return [r for r in self.stages if r.used and not self.fits(r)]

    def table(self) -> str:
        return format_plan(self)


def _ceil_div(a: int, b: int) -> int:
    return -(-int(a) // int(b))


def _dtype_bytes(dtype: str) -> int:
    return 2 if dtype in ("bfloat16", "float16") else 4


def _method_stages(config) -> set:
    method = str(config.method)
    used = {"sample eval", "sft"}
    if method in ("st", "dpo_st"):
        used.add("sample labels")
    if method == "dpo_st":
        used |= {"sample pairs", f"dpo (ref {config.dpo.reference})"}
    return used


def default_device_memory() -> tuple[int | None, str]:
    """Bytes one device can hold: memory_stats' bytes_limit, else host RAM / local devices (CPU)."""
    import jax

    device = jax.local_devices()[0]
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001 - backends without memory stats
        stats = None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"]), f"memory_stats of {device.device_kind}"
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None, "unknown (pass --device_memory_gb)"
    n = max(1, jax.local_device_count())
    return ram // n, f"host RAM / {n} local device(s)"


def plan(config, mesh_shape: Mapping[str, int] | None = None, device_memory_bytes: int | None = None, *,
         num_devices: int | None = None, memory_source: str | None = None, config_name: str = "") -> Plan:
    """Per-device memory of every stage of `config` on a mesh of `mesh_shape` (default config.mesh).

    device_memory_bytes None: read from the first device (memory_stats) or host RAM (CPU).
    num_devices resolves a -1 in the mesh (default: jax.device_count()).
    """
    spec = resolve_model(config)
    rules = config.sharding.rules if "sharding" in config else None
    from dpost import sharding

    rules = sharding.rules_from_config(rules)
    sizes = resolve_mesh(mesh_shape if mesh_shape is not None else dict(config.mesh), num_devices)
    n_devices = math.prod(sizes.values())
    if device_memory_bytes is None:
        device_memory_bytes, source = default_device_memory()
        memory_source = memory_source or source
    memory_source = memory_source or "given"

    info = param_info(spec, sizes, rules)
    dims = _dims(spec.family, spec.config)
    a = _dtype_bytes(spec.config.dtype)
    split = lambda logical, dim: dim // _shards(logical, dim, sizes, rules)  # noqa: E731
    s = Shape(a=a, d=dims["d"], f=split("act_mlp", dims["f"]), h=split("act_heads", dims["heads"]),
              k=split("kv_heads", dims["kv_heads"]), dh=dims["head_dim"], v=split("act_vocab", dims["vocab"]),
              layers=dims["layers"], dec_layers=dims["dec_layers"])
    batch_shards = math.prod(
        sizes[ax] for ax in _as_tuple(dict(rules).get("batch")) if ax in sizes
    )
    p, c = int(config.data.max_prompt_len), int(config.data.max_target_len)
    remat = bool(spec.config.remat)
    chunk = int(config.model.logits_chunk)
    # Weight copies. Training in bf16 casts this device's shards once per step (layers.compute_params:
    # a bf16 copy of the same size ratio); the sampler decodes from its own copy of the params, split
    # per layer and in the compute dtype (sampling.decode_layout), in fp32 too. Under fsdp each
    # layer's weights are also all-gathered as the layers run (two layers at a time with remat or in
    # the decode loop, all of them kept for the backward pass without remat).
    two_layers = 2 * max(info.layer_gathered.values(), default=0)
    fsdp = sizes["fsdp"] > 1
    cast_copy = info.per_device * a // 4 if a != 4 else 0
    copies_train = cast_copy + (((two_layers if remat else info.layers_gathered) + info.rest_gathered) * a // 4
                                if fsdp else 0)
    copies_infer = info.per_device * a // 4 + ((two_layers + info.rest_gathered) * a // 4 if fsdp else 0)
    used = _method_stages(config)
    warnings = []
    rows: list[StageRow] = []

    def per_device_rows(global_rows: int, accum: int, what: str) -> int:
        micro = _ceil_div(global_rows, max(1, accum))
        if micro % batch_shards:
            warnings.append(f"{what}: micro-batch {micro} is not divisible by the {batch_shards} batch shards")
        return _ceil_div(micro, batch_shards)

    # -- SFT ----------------------------------------------------------------------------------
    accum = int(config.sft.grad_accum)
    b = per_device_rows(int(config.sft.batch_size), accum, "sft")
    act_r = training_activations(spec.family, s, b, p, c, True, chunk)
    act_n = training_activations(spec.family, s, b, p, c, False, chunk)
    seq = f"{p}+{c}" if spec.family == "llama" else f"{p}->{c}"
    rows.append(StageRow(
        "sft", "sft" in used, f"{b} seq x {seq} tok",
        {"params": info.per_device, "grads": info.per_device * (2 if accum > 1 else 1), "adam": 2 * info.per_device,
         "weight copies": copies_train, "activations": act_r if remat else act_n},
        act_r, act_n,
        notes={"activations": f"{b} sequences of {seq} tokens per device, remat {'on' if remat else 'off'}"},
    ))

    # -- DPO ------------------------------------------------------------------------------------
    accum = int(config.dpo.grad_accum)
    pairs = per_device_rows(int(config.dpo.batch_size), accum, "dpo")
    pairs_full = _ceil_div(int(config.dpo.batch_size), batch_shards)
    act_r = training_activations(spec.family, s, 2 * pairs, p, c, True, chunk)
    act_n = training_activations(spec.family, s, 2 * pairs, p, c, False, chunk)
    ref_ws = inference_activations(spec.family, s, 2 * pairs_full, p, c)
    for reference in ("in_step", "precomputed"):
        in_step = reference == "in_step"
        pick = act_r if remat else act_n
        terms = {"params": info.per_device, "grads": info.per_device * (2 if accum > 1 else 1),
                 "adam": 2 * info.per_device}
        if in_step:
            terms["ref params"] = info.per_device
        terms["weight copies"] = copies_train
        terms["activations"] = max(pick, ref_ws) if in_step else pick
        rows.append(StageRow(
            f"dpo (ref {reference})", f"dpo (ref {reference})" in used,
            f"{pairs} pairs = {2 * pairs} seq x {seq} tok", terms,
            max(act_r, ref_ws) if in_step else act_r, max(act_n, ref_ws) if in_step else act_n,
            notes={"activations": f"{2 * pairs} sequences (chosen + rejected) of {seq} tokens per device"
                                  + (f"; reference forward over {2 * pairs_full} sequences" if in_step else "")},
        ))

    # -- sampling ---------------------------------------------------------------------------------
    # The sampler pads prompts to its bucket (sampling.<stage>.length_buckets, else quarter-octaves);
    # sampling.<stage>.batch_size counts sequences, i.e. batch_size // num_samples prompts per call
    # (dpost.stages.prompts_per_batch).
    from dpost.sampling import prompt_length_bucket

    for name in ("pairs", "labels", "eval"):
        sc = config.sampling[name]
        p_s = prompt_length_bucket(p, sc.length_buckets or None)  # as dpost.stages passes it
        n, m = int(sc.num_samples), int(sc.max_new_tokens)
        prompts = _ceil_div(max(1, int(sc.batch_size) // n), batch_shards)
        rows_dev = prompts * n
        cache = kv_cache_bytes(spec.family, s, rows_dev, p_s, m)
        prefill, decode = sampling_activations(spec.family, s, prompts, n, p_s, m)
        act = max(prefill, decode)
        rows.append(StageRow(
            f"sample {name}", f"sample {name}" in used, f"{prompts} prompts x {n} = {rows_dev} rows x {p_s}+{m} tok",
            {"params": info.per_device, "weight copies": copies_infer, "activations": act, "kv cache": cache},
            act, act,
            notes={"kv cache": f"{rows_dev} rows x {p_s}+{m} tokens", "activations": f"prefill {_fmt(prefill)}, "
                   f"decode {_fmt(decode)} (a second self-attention cache while a step writes the new one)"},
        ))

    return Plan(
        config_name=config_name, family=spec.family, source=spec.source,
        origin=spec.origin, model_config=spec.config, dtype=spec.config.dtype, remat=remat, mesh=sizes,
        num_devices=n_devices, param_count=info.count, param_bytes=info.bytes_fp32,
        device_memory_bytes=device_memory_bytes, device_memory_source=memory_source, stages=rows,
        warnings=warnings,
    )


def _as_tuple(axes) -> tuple:
    if axes is None:
        return ()
    return tuple(axes) if isinstance(axes, (tuple, list)) else (axes,)


def check_fits(plan: Plan) -> None:
    """Raises ValueError naming the (most) over-budget stage this run executes and its largest term."""
    over = plan.over_budget()
    if not over:
        return
    worst = max(over, key=lambda r: r.total)
    name, size = worst.largest()
    note = worst.notes.get(name)
    others = [r.stage for r in over if r is not worst]
    raise ValueError(
        f"memory plan: stage '{worst.stage}' needs {_fmt(worst.total)} per device but a device has "
        f"{_fmt(plan.device_memory_bytes)} ({plan.device_memory_source}); largest term: {name} {_fmt(size)}"
        + (f" ({note})" if note else "")
        + f" on mesh {_mesh_str(plan.mesh)}. Try: {_hint(worst.stage, name)}."
        + (f" Also over budget: {', '.join(others)}." if others else "")
        + " (python -m dpost.plan --config ... prints every term.)"
    )


def _hint(stage: str, term: str) -> str:
    if stage.startswith("sample "):
        return SAMPLING_HINTS.get(term, HINTS[term]).format(stage=stage.split(" ", 1)[1])
    return HINTS[term].format(stage=stage.split(" ", 1)[0])


# --------------------------------------------------------------------------------------------------
# printing
# --------------------------------------------------------------------------------------------------
def _fmt(n: int | None) -> str:
    if n is None:
        return "?"
    if n >= GiB:
        return f"{n / GiB:.2f} GiB"
    return f"{n / 1024**2:.1f} MiB"


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M" if n >= 1e6 else f"{n / 1e3:.1f} K"


def _cell(n: int | None, unit: int) -> str:
    if n is None:
        return "-"
    if n == 0:
        return "0"
    return f"{n / unit:.2f}" if unit == GiB else f"{n / unit:.1f}"


def _mesh_str(mesh: Mapping[str, int]) -> str:
    return ",".join(f"{k}={v}" for k, v in mesh.items())


def format_plan(p: Plan) -> str:
    big = max(r.total for r in p.stages) >= GiB or (p.device_memory_bytes or 0) >= 64 * GiB
    unit, uname = (GiB, "GiB") if big else (1024**2, "MiB")
    lines = [
        f"dpost memory plan{': ' + p.config_name if p.config_name else ''}",
        f"model   {p.family} {p.source} ({_count(p.param_count)} params, fp32 masters {_fmt(p.param_bytes)}; "
        f"shapes from {p.origin})",
        f"        compute {p.dtype}, remat {'on' if p.remat else 'off'}",
        f"mesh    {_mesh_str(p.mesh)} ({p.num_devices} device{'s' if p.num_devices != 1 else ''})",
        f"device  {_fmt(p.device_memory_bytes)} per device ({p.device_memory_source})",
        f"per-device {uname}; * = stage this config runs; act = activations, the one in the total marked <",
        "",
    ]
    header = ["stage", "per device", "params", "grads", "adam", "ref", "w.copy", "act:remat", "act:full", "kv cache",
              "total", "use%", "verdict"]
    table = []
    for r in p.stages:
        t = r.terms
        training = "grads" in t
        ar = _cell(r.activations_remat, unit)
        an = _cell(r.activations_no_remat, unit)
        if training:
            ar, an = (ar + "<", an) if p.remat else (ar, an + "<")
        else:
            ar, an = (ar + "<", an + "<") if r.activations_remat == r.activations_no_remat else (ar, an)
        budget = p.device_memory_bytes
        table.append([
            ("* " if r.used else "  ") + r.stage, r.batch,
            _cell(t.get("params"), unit), _cell(t.get("grads"), unit) if training else "-",
            _cell(t.get("adam"), unit) if training else "-",
            _cell(t.get("ref params"), unit) if "ref params" in t else "-",
            _cell(t.get("weight copies"), unit), ar, an,
            _cell(t.get("kv cache"), unit) if "kv cache" in t else "-",
            _cell(r.total, unit), f"{100 * r.total / budget:.0f}%" if budget else "?",
            "fits" if p.fits(r) else "does not fit",
        ])
    widths = [max(len(str(x)) for x in col) for col in zip(header, *table)]
    fmt_row = lambda row: "  ".join(  # noqa: E731
        str(x).ljust(w) if i < 2 or i == len(row) - 1 else str(x).rjust(w) for i, (x, w) in enumerate(zip(row, widths))
    ).rstrip()
    lines.append(fmt_row(header))
    lines.append(fmt_row(["-" * w for w in widths]))
    lines.extend(fmt_row(row) for row in table)
    over = p.over_budget()
    lines.append("")
    if over:
        lines.append("verdict: does not fit: " + ", ".join(r.stage for r in over))
    else:
        lines.append("verdict: fits: every stage this config runs fits the device")
    for w in p.warnings:
        lines.append(f"warning: {w}")
    lines.append("terms and formulas: python -c 'import dpost.plan; help(dpost.plan)'")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------------
def parse_mesh(text: str) -> dict[str, int]:
    """'data=1,fsdp=8,tensor=2' -> dict (missing axes are 1)."""
    out = {}
    for part in filter(None, (x.strip() for x in text.split(","))):
        axis, sep, value = part.partition("=")
        if not sep:
            raise ValueError(f"--mesh {text!r}: expected axis=size pairs like data=1,fsdp=8,tensor=1")
        out[axis.strip()] = int(value)
    return out


def main(argv=None) -> int:
    from absl import app, flags
    from ml_collections import config_flags

    config_flag = config_flags.DEFINE_config_file("config", None, "Path to a configs/*.py file.", lock_config=True)
    mesh_flag = flags.DEFINE_string("mesh", None, "Mesh shape, e.g. data=1,fsdp=8,tensor=1 (default: config.mesh).")
    mem_flag = flags.DEFINE_float("device_memory_gb", None, "Memory per device in GiB (default: read from the device).")
    ndev_flag = flags.DEFINE_integer("num_devices", None, "Device count that resolves a -1 in the mesh.")
    check_flag = flags.DEFINE_bool("check", False, "Exit with status 1 (and the reason) when a stage does not fit.")
    flags.mark_flag_as_required("config")

    def run(_argv) -> int:
        config = config_flag.value
        try:
            mesh = parse_mesh(mesh_flag.value) if mesh_flag.value else None
            mem = int(mem_flag.value * GiB) if mem_flag.value else None
            result = plan(config, mesh, mem, num_devices=ndev_flag.value,
                          memory_source="--device_memory_gb" if mem else None,
                          config_name=flags.FLAGS["config"].config_filename)
        except (ValueError, FileNotFoundError) as err:
            print(f"dpost.plan: error: {err}", file=sys.stderr)
            return 2
        print(result.table())
        if check_flag.value:
            try:
                check_fits(result)
            except ValueError as err:
                print(f"dpost.plan: {err}", file=sys.stderr)
                return 1
        return 0

    app.run(lambda a: sys.exit(run(a)), argv=argv)
    return 0


if __name__ == "__main__":
    main()
