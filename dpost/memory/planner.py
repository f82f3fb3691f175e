"""The memory plan: per-device bytes of every DPO-ST stage, before anything is allocated.

`plan(config, mesh_shape, device_memory_bytes)` returns one `StageRow` per stage (warm-up/iteration
SFT, DPO with the reference in the step or precomputed, sampling for pairs / pseudo-labels /
evaluation) with the per-device bytes of each term (`dpost.memory.formulas`); `check_fits(plan)`
raises `ValueError` naming the stage and its largest term. `check_run` is what the driver calls
before the first stage: it refuses a run that cannot fit and warns (the run goes on) when the
model's shapes cannot be read without loading it.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from typing import Any, Mapping

from dpost import sharding
from dpost.sharding import Layout
from dpost.memory import report
from dpost.memory.formulas import (Shape, inference_activations, kv_cache_bytes, sampling_activations,
                                   training_activations)
from dpost.memory.shards import dims, param_info, shards
from dpost.models.shapes import UnknownShapes, model_shapes

log = logging.getLogger(__name__)

HINTS = {
    "params": "shard the parameters over more devices (a larger mesh fsdp axis) or add tensor parallelism",
    "grads": "shard over more devices (mesh fsdp) or use grad_accum=1 (accumulation keeps a second gradient copy)",
    "optimizer": "shard the optimizer state over more devices (a larger mesh fsdp axis), or set "
            "{stage}.optimizer.moments_dtype=bfloat16 (and average_last=0: no averaged copy of the params)",
    "ref params": "use dpo.reference=precomputed (reference log-probs scored once, no reference weights in the step)",
    "weight copies": "set model.remat=full or dots (only two layers' all-gathered copies live at once)",
    "activations": "set model.remat=full (or dots, which keeps the matmul outputs), model.logits_chunk "
                   "(decoder-only), raise {stage}.grad_accum, or spread "
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
    # training rows: both alternatives, for the table (remat: the run's policy, full when it is none)
    activations_remat: int | None = None
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
    remat: str  # dpost.models.layers.REMATS
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
        return report.format_plan(self)


def _ceil_div(a: int, b: int) -> int:
    return -(-int(a) // int(b))


def _dtype_bytes(dtype: str) -> int:
    return 2 if dtype in ("bfloat16", "float16") else 4


def optimizer_bytes(param_bytes: int, opt_cfg) -> int:
    """The optimizer state for fp32 params of `param_bytes`: AdamW's two moments, the first in
    `moments_dtype`, the second always fp32 (optax's mu_dtype covers only the first), plus an fp32
    copy of the params where `average_last` keeps a tail average (dpost.training.optimizer)."""
    average = param_bytes if float(opt_cfg.get("average_last", 0.0)) > 0 else 0
    return param_bytes + param_bytes * _dtype_bytes(opt_cfg.moments_dtype) // 4 + average


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


def planning_layout(config, layout: Layout | Mapping[str, int] | None = None,
                    num_devices: int | None = None) -> Layout:
    """`layout` on an abstract mesh of its shape; a mesh shape (default config.mesh, a -1 resolved
    against num_devices, default jax.device_count()) gets config.sharding.rules."""
    if isinstance(layout, Layout):
        sizes = dict(layout.mesh.shape) if layout.mesh is not None else {}
        return layout.on(sharding.abstract_mesh(sharding.mesh_shape(sizes or {"data": 1})))
    sizes = sharding.mesh_shape(layout if layout is not None else dict(config.mesh), num_devices)
    return Layout(sharding.abstract_mesh(sizes), config.sharding.rules)


def plan(config, layout: Layout | Mapping[str, int] | None = None, device_memory_bytes: int | None = None, *,
         num_devices: int | None = None, memory_source: str | None = None, config_name: str = "") -> Plan:
    """Per-device memory of every stage of `config` laid out by `layout` (the run's `Layout`, or a
    mesh shape planned with config.sharding.rules; default config.mesh): see `planning_layout`.

    device_memory_bytes None: read from the first device (memory_stats) or host RAM (CPU).
    """
    model = model_shapes(config)
    layout = planning_layout(config, layout, num_devices)
    sizes = dict(layout.mesh.shape)
    n_devices = math.prod(sizes.values())
    if device_memory_bytes is None:
        device_memory_bytes, source = default_device_memory()
        memory_source = memory_source or source
    memory_source = memory_source or "given"

    info = param_info(model, layout)
    widths = dims(model.family, model.config)
    a = _dtype_bytes(model.config.dtype)
    split = lambda logical, dim: dim // shards(logical, dim, layout)  # noqa: E731
    s = Shape(a=a, d=widths["d"], f=split("act_mlp", widths["f"]), h=split("act_heads", widths["heads"]),
              k=split("kv_heads", widths["kv_heads"]), dh=widths["head_dim"], v=split("act_vocab", widths["vocab"]),
              layers=widths["layers"], dec_layers=widths["dec_layers"])
    batch_shards = layout.batch_shards
    p, c = int(config.data.max_prompt_len), int(config.data.max_target_len)
    remat = model.config.remat
    remat_on = remat != "none"
    chunk = int(config.model.logits_chunk)
    # Weight copies. Training in bf16 casts this device's shards once per step (layers.compute_params:
    # a bf16 copy of the same size ratio); the sampler decodes from its own copy of the params, split
    # per layer and in the compute dtype (sampling.decode_layout), in fp32 too. Under fsdp each
    # layer's weights are also all-gathered as the layers run (two layers at a time with remat or in
    # the decode loop, all of them kept for the backward pass without remat).
    two_layers = 2 * max(info.layer_gathered.values(), default=0)
    fsdp = sizes["fsdp"] > 1
    cast_copy = info.per_device * a // 4 if a != 4 else 0
    copies_train = cast_copy + (((two_layers if remat_on else info.layers_gathered) + info.rest_gathered) * a // 4
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
    policy = remat if remat_on else "full"  # the table's remat column when the run does not remat
    act_r = training_activations(model.family, s, b, p, c, policy, chunk)
    act_n = training_activations(model.family, s, b, p, c, "none", chunk)
    seq = f"{p}+{c}" if model.family == "llama" else f"{p}->{c}"
    rows.append(StageRow(
        "sft", "sft" in used, f"{b} seq x {seq} tok",
        {"params": info.per_device, "grads": info.per_device * (2 if accum > 1 else 1),
         "optimizer": optimizer_bytes(info.per_device, config.sft.optimizer),
         "weight copies": copies_train, "activations": act_r if remat_on else act_n},
        act_r, act_n,
        notes={"activations": f"{b} sequences of {seq} tokens per device, remat {report.remat_words(remat)}"},
    ))

    # -- DPO ------------------------------------------------------------------------------------
    accum = int(config.dpo.grad_accum)
    pairs = per_device_rows(int(config.dpo.batch_size), accum, "dpo")
    pairs_full = _ceil_div(int(config.dpo.batch_size), batch_shards)
    act_r = training_activations(model.family, s, 2 * pairs, p, c, policy, chunk)
    act_n = training_activations(model.family, s, 2 * pairs, p, c, "none", chunk)
    ref_ws = inference_activations(model.family, s, 2 * pairs_full, p, c)
    for reference in ("in_step", "precomputed"):
        in_step = reference == "in_step"
        pick = act_r if remat_on else act_n
        terms = {"params": info.per_device, "grads": info.per_device * (2 if accum > 1 else 1),
                 "optimizer": optimizer_bytes(info.per_device, config.dpo.optimizer)}
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
        cache = kv_cache_bytes(model.family, s, rows_dev, p_s, m)
        prefill, decode = sampling_activations(model.family, s, prompts, n, p_s, m)
        act = max(prefill, decode)
        rows.append(StageRow(
            f"sample {name}", f"sample {name}" in used, f"{prompts} prompts x {n} = {rows_dev} rows x {p_s}+{m} tok",
            {"params": info.per_device, "weight copies": copies_infer, "activations": act, "kv cache": cache},
            act, act,
            notes={"kv cache": f"{rows_dev} rows x {p_s}+{m} tokens", "activations": f"prefill {report.fmt(prefill)}, "
                   f"decode {report.fmt(decode)} (a second self-attention cache while a step writes the new one)"},
        ))

    return Plan(
        config_name=config_name, family=model.family, source=model.source,
        origin=model.origin, model_config=model.config, dtype=model.config.dtype, remat=remat, mesh=sizes,
        num_devices=n_devices, param_count=info.count, param_bytes=info.bytes_fp32,
        device_memory_bytes=device_memory_bytes, device_memory_source=memory_source, stages=rows,
        warnings=warnings,
    )


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
        f"memory plan: stage '{worst.stage}' needs {report.fmt(worst.total)} per device but a device has "
        f"{report.fmt(plan.device_memory_bytes)} ({plan.device_memory_source}); largest term: {name} {report.fmt(size)}"
        + (f" ({note})" if note else "")
        + f" on mesh {report.mesh_str(plan.mesh)}. Try: {_hint(worst.stage, name)}."
        + (f" Also over budget: {', '.join(others)}." if others else "")
        + " (python -m dpost.memory --config ... prints every term.)"
    )


def _hint(stage: str, term: str) -> str:
    if stage.startswith("sample "):
        return SAMPLING_HINTS.get(term, HINTS[term]).format(stage=stage.split(" ", 1)[1])
    return HINTS[term].format(stage=stage.split(" ", 1)[0])



def check_run(config, layout: Layout | Mapping[str, int], device_memory_bytes: int | None = None) -> Plan | None:
    """Refuses, with the numbers, a run that cannot fit in device memory; when the model's shapes
    cannot be read before loading it (a hub id neither known nor cached), warns and lets it run."""
    try:
        memory_plan = plan(config, layout, device_memory_bytes)
    except UnknownShapes as err:
        log.warning("memory plan: cannot estimate (%s); the run goes on without a memory check", err)
        return None
    check_fits(memory_plan)
    return memory_plan
