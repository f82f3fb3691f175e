"""Accelerator benchmark: SFT / DPO train-step MFU and sampler tokens/s on random models.

    python bench/accelerator.py                      # ~1.1B Llama shape + Flan-T5-Large shape, bf16
    python bench/accelerator.py --tiny               # smoke test on CPU (tiny shapes, < 1 minute)
    python bench/accelerator.py --peak_tflops 989 --hbm_tbps 3.35 --mesh data=1,fsdp=8
    python bench/accelerator.py --models llama-1b --stages sft --profile /tmp/prof   # + a trace per row
    python bench/accelerator.py --models llama-1b --stages sft,dpo --batch 16 --remat full  # without remat: OOM on 80 GB
    python bench/accelerator.py --models llama-1b --stages sft,dpo --logits_chunk 128   # chunked vocabulary head

Models (random weights, fp32 masters, compute in --dtype):
  llama-1b       Llama-shaped, TinyLlama-1.1B dimensions (d 2048, MLP 5632, 22 layers, 32 heads,
                 4 KV heads, vocab 32000): 1.1 B parameters
  flan-t5-large  Flan-T5-Large dimensions (dpost/models/t5/known.py): 0.78 B parameters

Rows:
  sft      one `training.make_sft_step` update on --batch sequences per device
           (Llama: prompt 256 + target 384 tokens; T5: 200 encoder / 300 decoder tokens)
  dpo      one `training.make_dpo_step` update on --batch/2 pairs per device (reference
           log-probs precomputed, the protocol's default; --dpo_reference in_step adds the
           reference forward to the step and to the model FLOPs)
  sample   `sampling.generate` of --sample_batch prompts per device x 1 sample, prompt 128
           tokens, 256 new tokens (EOS ignored), temperature 0.7; tokens/s counts generated tokens
           (prefill time included)

MFU = model FLOPs / step time / (peak bf16 FLOP/s x devices). Model FLOPs count the matmuls of
forward + backward (3 x forward) without rematerialisation: per token 2 x (weights touched) plus
attention 4 x heads x head_dim x keys per layer, the vocabulary head only on target positions
(see `train_flops`). Peak FLOP/s and HBM bandwidth come from --peak_tflops / --hbm_tbps or from
`PEAKS` by device kind (H100 SXM 989 TFLOP/s dense bf16 and 3.35 TB/s, H200 989 and 4.8, A100
312 and 2.0, TPU v4 275 and 1.2, v5e 197 and 0.82, ...). The sampler's bandwidth bound assumes
every decode step reads all parameters in the compute dtype (the sampler's decode copy of the
params, `sampling.decode_layout`) plus the KV cache up to the current position; "bound" = rows x
new tokens / (steps x bytes per step / bandwidth).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import time

# Smoke mode compiles a dozen programs on a small CPU: cut XLA's backend optimisation so that the
# whole run stays under a minute (must happen before jax is imported).
if "--tiny" in sys.argv and "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from dpost import models, sampling, sharding, training  # noqa: E402
from dpost.models import layers, sources  # noqa: E402
from dpost.models.llama.model import LlamaConfig  # noqa: E402
from dpost.models.registry import get_family  # noqa: E402
from dpost.models.t5.model import T5Config  # noqa: E402

# device kind substring -> (dense bf16 TFLOP/s per device, HBM TB/s per device); first match wins.
PEAKS = (
    ("H100 PCIe", 756.0, 2.0),
    ("H100", 989.0, 3.35),
    ("H200", 989.0, 4.8),
    ("GH200", 989.0, 4.0),
    ("A100", 312.0, 2.0),
    ("L4", 121.0, 0.3),
    ("TPU v4", 275.0, 1.2),
    ("TPU v5 lite", 197.0, 0.82),
    ("TPU v5e", 197.0, 0.82),
    ("TPU v5p", 459.0, 2.76),
    ("TPU v5", 459.0, 2.76),
    ("TPU v6 lite", 918.0, 1.64),
)


def llama_1b(dtype: str) -> LlamaConfig:
    return LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_layers=22, num_heads=32,
                       num_kv_heads=4, head_dim=64, dtype=dtype, max_position_embeddings=2048)


def flan_t5_large(dtype: str) -> T5Config:
    from dpost.models.t5.params import config_from_hf
    from dpost.models.t5.known import HF_CONFIGS

    return dataclasses.replace(config_from_hf(HF_CONFIGS["google/flan-t5-large"]), dtype=dtype)


def tiny_llama(dtype: str) -> LlamaConfig:
    return LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=192, num_layers=2, num_heads=4,
                       num_kv_heads=2, head_dim=16, dtype=dtype)


def tiny_t5(dtype: str) -> T5Config:
    return T5Config(vocab_size=512, d_model=64, d_kv=16, d_ff=192, num_layers=2, num_heads=4,
                    feed_forward_proj="gated-gelu", tie_word_embeddings=False, dtype=dtype)


@dataclasses.dataclass(frozen=True)
class Shapes:
    prompt: int  # decoder-only prompt / T5 encoder tokens
    target: int  # target tokens
    sample_prompt: int
    sample_new: int


FULL = {"llama": Shapes(256, 384, 128, 256), "t5": Shapes(200, 300, 128, 256)}
TINY = {"llama": Shapes(32, 32, 16, 16), "t5": Shapes(32, 32, 16, 16)}


# --------------------------------------------------------------------------------------------------
# model FLOPs
# --------------------------------------------------------------------------------------------------
def forward_flops(family: str, cfg, batch: int, prompt: int, target: int) -> float:
    """Matmul FLOPs of one forward pass over `batch` sequences (no recompute, full attention)."""
    if family == "llama":
        d, f, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers
        q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        t = prompt + target
        per_token = L * (2 * (d * (q + 2 * kv) + q * d + 3 * d * f) + 4 * q * t)
        return batch * (t * per_token + target * 2 * d * cfg.vocab_size)
    d, f = cfg.d_model, cfg.d_ff
    q = cfg.num_heads * cfg.d_kv
    mlp = (3 if cfg.feed_forward_proj.startswith("gated") else 2) * d * f
    enc = cfg.num_layers * (2 * (4 * d * q + mlp) + 4 * q * prompt)
    dec = cfg.num_decoder_layers * (2 * (4 * d * q + 2 * d * q + mlp) + 4 * q * target + 4 * q * prompt)
    cross_kv = cfg.num_decoder_layers * 2 * 2 * d * q  # per encoder token
    return batch * (prompt * (enc + cross_kv) + target * (dec + 2 * d * cfg.vocab_size))


def train_flops(family: str, cfg, batch: int, prompt: int, target: int) -> float:
    return 3.0 * forward_flops(family, cfg, batch, prompt, target)


# --------------------------------------------------------------------------------------------------
# runs
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Row:
    model: str
    params: int
    stage: str
    batch: str
    seconds: float  # per step (train) or per generate call (sampler)
    tokens_per_s: float
    tflops: float | None = None  # achieved model TFLOP/s (all devices)
    mfu: float | None = None
    bound_tokens_per_s: float | None = None


def _timed(fn, repeats: int) -> float:
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - t0)
    return best


def _state_shardings(family, cfg, tx, mesh):
    if mesh is None:
        return None
    import flax.linen as nn

    boxed = sources.abstract_params(get_family(family), cfg)
    return training.state_shardings(sharding.param_shardings(boxed, mesh), tx, nn.unbox(boxed), sharding.Layout(mesh))


def _random_batch(rng, rows: int, prompt: int, target: int, vocab: int, dpo: bool) -> dict:
    tok = lambda n: rng.integers(3, vocab, (rows, n), dtype=np.int32)  # noqa: E731
    ones = lambda n: np.ones((rows, n), np.int32)  # noqa: E731
    if not dpo:
        return {"prompt": tok(prompt), "prompt_mask": ones(prompt), "completion": tok(target),
                "completion_mask": ones(target)}
    return {"prompt": tok(prompt), "prompt_mask": ones(prompt), "chosen": tok(target), "chosen_mask": ones(target),
            "rejected": tok(target), "rejected_mask": ones(target),
            "ref_chosen_logps": np.zeros((rows,), np.float32), "ref_rejected_logps": np.zeros((rows,), np.float32)}


OPTIMIZER = training.OptimizerConfig(learning_rate=1e-5, total_steps=1000, weight_decay=0.01, warmup_ratio=0.1,
                                     min_lr_rate=0.1)


def bench_train(name, family, cfg, bundle, stage, rows_per_device, shapes: Shapes, mesh, n_dev, args, peak,
                holder: dict):
    """One row; `holder` keeps the model's train state across stages (created once, donated by each step)."""
    opt = OPTIMIZER
    tx = training.make_optimizer(opt)
    if "state" not in holder:
        holder["shardings"] = _state_shardings(family, cfg, tx, mesh)
        holder["state"] = training.create_train_state(bundle.params, tx, rng=0, shardings=holder["shardings"])
    st_sh = holder["shardings"]
    rows = rows_per_device * n_dev
    rng = np.random.default_rng(0)
    if stage == "sft":
        step = training.make_sft_step(bundle.module, tx, lr_schedule=training.make_schedule(opt), layout=sharding.Layout(mesh),
                                      state_shardings=st_sh, logits_chunk=args.logits_chunk)
        batch = training.put_batch(_random_batch(rng, rows, shapes.prompt, shapes.target, cfg.vocab_size, False), sharding.Layout(mesh))
        extra = ()
        flops = train_flops(family, cfg, rows, shapes.prompt, shapes.target)
        sequences = rows
        what = f"{rows_per_device} seq"
    else:
        pairs = max(1, rows // 2)
        dpo_cfg = training.DPOConfig(reference=args.dpo_reference)
        step = training.make_dpo_step(bundle.module, tx, dpo_cfg, lr_schedule=training.make_schedule(opt), layout=sharding.Layout(mesh),
                                      state_shardings=st_sh, ref_shardings=st_sh.params if st_sh else None,
                                      logits_chunk=args.logits_chunk)
        host = _random_batch(rng, pairs, shapes.prompt, shapes.target, cfg.vocab_size, True)
        if args.dpo_reference == "in_step":
            host.pop("ref_chosen_logps"), host.pop("ref_rejected_logps")
            extra = (bundle.params,)
        else:
            extra = ()
        batch = training.put_batch(host, sharding.Layout(mesh))
        flops = train_flops(family, cfg, 2 * pairs, shapes.prompt, shapes.target)
        if args.dpo_reference == "in_step":
            flops += forward_flops(family, cfg, 2 * pairs, shapes.prompt, shapes.target)
        sequences = 2 * pairs
        what = f"{max(1, rows_per_device // 2)} pairs"

    def one():
        holder["state"], metrics = step(holder["state"], batch, *extra)
        return metrics

    jax.block_until_ready(one())  # compile + first step
    seconds = _timed(one, args.steps)
    _profile(args, name, stage, one)
    tokens = sequences * (shapes.prompt + shapes.target)
    achieved = flops / seconds
    mfu = achieved / (peak * 1e12 * n_dev) if peak else None
    seq = f"{shapes.prompt}+{shapes.target}" if family == "llama" else f"{shapes.prompt}->{shapes.target}"
    return Row(name, _count(bundle.params), stage + ("" if stage == "sft" else f" (ref {args.dpo_reference})"),
               f"{what} x {seq}", seconds, tokens / seconds, achieved / 1e12, mfu)


def bench_sampler(name, family, cfg, bundle, prompts_per_device, shapes: Shapes, mesh, n_dev, args, hbm):
    rows = prompts_per_device * n_dev
    rng = np.random.default_rng(1)
    prompts = [rng.integers(3, cfg.vocab_size, shapes.sample_prompt).tolist() for _ in range(rows)]

    def one():
        return sampling.generate(bundle, prompts, num_samples=1, max_new_tokens=shapes.sample_new, temperature=0.7,
                                 seed=0, mesh=mesh, batch_size=rows, ignore_eos=True)

    one()  # compile
    t0 = time.perf_counter()
    out = one()
    seconds = time.perf_counter() - t0
    _profile(args, name, "sample", one)
    generated = sum(len(s.token_ids) for group in out for s in group)
    bound = None
    if hbm:
        a = 2 if cfg.dtype == "bfloat16" else 4
        param_bytes = _count(bundle.params) * a / n_dev  # the decode copy, in the compute dtype (per device)
        if family == "llama":
            per_pos = cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 2 * a
            avg_keys = shapes.sample_prompt + shapes.sample_new / 2
        else:
            per_pos = cfg.num_decoder_layers * cfg.num_heads * cfg.d_kv * 2 * a
            avg_keys = shapes.sample_prompt + shapes.sample_new / 2  # cross (prompt) + self (new so far)
        step_bytes = param_bytes + prompts_per_device * avg_keys * per_pos
        step_time = step_bytes / (hbm * 1e12)
        bound = rows / step_time
    shape = f"{prompts_per_device} x {shapes.sample_prompt}+{shapes.sample_new}"
    return Row(name, _count(bundle.params), "sample", shape, seconds, generated / seconds, bound_tokens_per_s=bound)


def _profile(args, name: str, stage: str, one) -> None:
    """With --profile DIR: one more step under `jax.profiler.trace` (DIR/<model>-<stage>/...xplane.pb)."""
    if not args.profile:
        return
    folder = os.path.join(args.profile, f"{name}-{stage}".replace(" ", "_").replace("(", "").replace(")", ""))
    with jax.profiler.trace(folder):
        jax.block_until_ready(one())


def _peak_memory() -> str:
    """The device allocator's peak so far (GPU/TPU; CPU has no allocator statistics): run one
    stage per process to read a stage's own peak."""
    stats = jax.devices()[0].memory_stats() or {}
    return f"; device memory peak {stats['peak_bytes_in_use'] / 2**30:.2f} GiB" if "peak_bytes_in_use" in stats else ""


def _count(params) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


def _fmt_num(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def format_table(rows: list[Row], device: str, n_dev: int, peak, hbm, dtype: str) -> str:
    lines = [
        f"device: {n_dev} x {device}; peak {peak or '?'} TFLOP/s bf16 and {hbm or '?'} TB/s per device; "
        f"compute {dtype}",
        "",
    ]
    header = ["model", "params", "stage", "per device", "s/step", "tokens/s", "TFLOP/s", "MFU", "bound tok/s",
              "% of bound"]
    body = []
    for r in rows:
        body.append([
            r.model, f"{r.params / 1e9:.2f} B" if r.params >= 1e8 else f"{r.params / 1e6:.2f} M", r.stage, r.batch,
            f"{r.seconds:.3f}", f"{r.tokens_per_s:,.0f}", _fmt_num(r.tflops, ".2f"),
            "-" if r.mfu is None else f"{100 * r.mfu:.1f}%",
            _fmt_num(r.bound_tokens_per_s, ",.0f"),
            "-" if r.bound_tokens_per_s is None else f"{100 * r.tokens_per_s / r.bound_tokens_per_s:.0f}%",
        ])
    widths = [max(len(str(x)) for x in col) for col in zip(header, *body)]
    fmt = lambda row: "  ".join(  # noqa: E731
        str(x).ljust(w) if i < 4 else str(x).rjust(w) for i, (x, w) in enumerate(zip(row, widths)))
    lines += [fmt(header), fmt(["-" * w for w in widths])] + [fmt(row) for row in body]
    return "\n".join(lines)


def device_peaks(kind: str) -> tuple[float | None, float | None]:
    for key, tflops, tbps in PEAKS:
        if key.lower() in kind.lower():
            return tflops, tbps
    return None, None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (CPU smoke test)")
    ap.add_argument("--models", default="llama-1b,flan-t5-large", help="comma list of llama-1b, flan-t5-large")
    ap.add_argument("--stages", default="sft,dpo,sample", help="comma list of sft, dpo, sample")
    ap.add_argument("--dtype", default=None, help="compute dtype (default bfloat16; --tiny: float32)")
    ap.add_argument("--batch", type=int, default=None, help="train sequences per device (default 8; --tiny 4)")
    ap.add_argument("--sample_batch", type=int, default=None, help="sampler prompts per device (default 64; --tiny 8)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (best of; default 5; --tiny 2)")
    ap.add_argument("--dpo_reference", default="precomputed", choices=("precomputed", "in_step"))
    ap.add_argument("--mesh", default=None, help="e.g. data=1,fsdp=8 (default: one device, no mesh)")
    ap.add_argument("--peak_tflops", type=float, default=None, help="peak bf16 TFLOP/s per device")
    ap.add_argument("--hbm_tbps", type=float, default=None, help="HBM bandwidth per device in TB/s")
    ap.add_argument("--remat", default="none", choices=layers.REMATS,
                    help="what each layer keeps for the backward pass in the train steps (model config field "
                         "`remat`; full or dots fit a larger --batch)")
    ap.add_argument("--attention", default="einsum", choices=layers.ATTENTIONS,
                    help="training/scoring/prefill attention (model config field `attention`)")
    ap.add_argument("--logits_chunk", type=int, default=None,
                    help="decoder-only train steps: vocabulary head this many target positions at a time")
    ap.add_argument("--profile", default=None, help="folder for a jax.profiler trace of one more step per row")
    args = ap.parse_args(argv)
    tiny = args.tiny
    dtype = args.dtype or ("float32" if tiny else "bfloat16")
    batch = args.batch or (4 if tiny else 8)
    sample_batch = args.sample_batch or (8 if tiny else 64)
    args.steps = args.steps or (2 if tiny else 5)
    shapes = TINY if tiny else FULL

    mesh = None
    if args.mesh:
        from dpost.memory.__main__ import parse_mesh

        mesh = sharding.make_mesh(parse_mesh(args.mesh))
    n_dev = mesh.size if mesh is not None else 1
    device = jax.devices()[0].device_kind
    peak, hbm = device_peaks(device)
    peak = args.peak_tflops or peak
    hbm = args.hbm_tbps or hbm

    builders = {"llama-1b": ("llama", tiny_llama if tiny else llama_1b),
                "flan-t5-large": ("t5", tiny_t5 if tiny else flan_t5_large)}
    rows: list[Row] = []
    for name in filter(None, args.models.split(",")):
        if name not in builders:
            ap.error(f"unknown model {name!r}; expected one of {sorted(builders)}")
        family, make = builders[name]
        cfg = dataclasses.replace(make(dtype), remat=args.remat, attention=args.attention)
        label = name + (" (tiny)" if tiny else "")
        bundle = models.init_random(family, cfg, seed=0, mesh=mesh)
        holder: dict = {}
        for stage in filter(None, args.stages.split(",")):
            t0 = time.perf_counter()
            if stage in ("sft", "dpo"):
                row = bench_train(label, family, cfg, bundle, stage, batch, shapes[family], mesh, n_dev, args, peak,
                                  holder)
            elif stage == "sample":
                row = bench_sampler(label, family, cfg, bundle, sample_batch, shapes[family], mesh, n_dev, args, hbm)
            else:
                ap.error(f"unknown stage {stage!r}")
            rows.append(row)
            print(f"  {label} {row.stage}: {row.seconds:.3f} s ({time.perf_counter() - t0:.1f} s with compile)"
                  f"{_peak_memory()}", file=sys.stderr, flush=True)
        del bundle, holder
    print(format_table(rows, device, n_dev, peak, hbm, dtype))
    return 0


if __name__ == "__main__":
    from dpost import startup

    # Same allocator as `python -m dpost.main` (dpost/startup.py); subprocesses (the peer) inherit it.
    startup.reexec_with_hugepage_malloc(__file__)
    print(f"# GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')!r}", flush=True)
    sys.exit(main())
