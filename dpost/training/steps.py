"""Jitted SFT and DPO train steps (and their eval counterparts).

One step = one optimizer update on one global batch:

* the batch is split into `grad_accum` micro-batches (strided rows, so every device keeps an equal
  share of each micro-batch) and gradients are summed in fp32 with `lax.scan`;
* losses are normalised by global-batch counts (target tokens for SFT, valid pairs for DPO) that
  are computed before the scan, so the result is independent of the device count and of
  `grad_accum` (not a per-device or per-micro-batch mean of means);
* with a `Layout` (a mesh and its logical-axis rules), the train state is laid out by the rules
  (params, grads and optimizer moments sharded alike), the batch is sharded along `batch`, and the
  state is donated;
* shapes are static per stage, so a stage compiles one program (`len(step.programs)`).

Batches are dicts of arrays as produced by `dpost.data.pipeline`:
  SFT:  prompt, prompt_mask [B, P] (left-padded), completion, completion_mask [B, C] (right-padded)
  DPO:  prompt, prompt_mask, chosen, chosen_mask, rejected, rejected_mask; with a precomputed
        reference also ref_chosen_logps, ref_rejected_logps [B]
  optional valid [B] (0 = filler row, excluded from every mean).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding

from dpost.sharding import Layout
from dpost import startup
from dpost.models import layers
from dpost.models.scoring import check_logits_chunk, completion_token_logprobs, head_logprobs, is_decoder_only
from dpost.training.losses import LOSS_TYPES, dpo_loss, masked_nll
from dpost.training.state import TrainState



DPO_REFERENCES = ("precomputed", "in_step")  # reference log-probs in the batch | ref params passed to the step


@dataclasses.dataclass(frozen=True)
class DPOConfig:
    beta: float = 0.1
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0
    rpo_alpha: float | None = None  # weight of an NLL term on the chosen completions (RPO)
    reference: str = "in_step"  # "in_step": ref params passed to the step | "precomputed": in the batch

    def __post_init__(self):
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"unknown DPO loss_type {self.loss_type!r}; expected one of {LOSS_TYPES}")
        if self.reference not in DPO_REFERENCES:
            raise ValueError(f"DPOConfig.reference must be one of {DPO_REFERENCES}, got {self.reference!r}")


# --------------------------------------------------------------------------------------------------
# forward pieces
# --------------------------------------------------------------------------------------------------
def _valid(batch, n: int) -> jax.Array:
    v = batch.get("valid")
    return jnp.ones((n,), jnp.float32) if v is None else v.astype(jnp.float32)


def sft_token_logprobs(module, params, batch, chunk: int | None = None, rngs=None) -> tuple[jax.Array, jax.Array]:
    """(token log-probs, loss mask), both [B, L], for a padded SFT batch. `rngs`: {"dropout": key}
    for a module built with dropout (`with_dropout`)."""
    params = layers.compute_params(module, params)
    mask = batch["completion_mask"].astype(jnp.float32) * _valid(batch, batch["completion"].shape[0])[:, None]
    logps = completion_token_logprobs(module, params, batch["prompt"], batch["prompt_mask"], batch["completion"],
                                batch["completion_mask"], chunk, rngs)
    return logps, mask


def _pad_to(x: jax.Array, length: int) -> jax.Array:
    return jnp.pad(x, ((0, 0), (0, length - x.shape[1])))


def shared_prefix_pair_logprobs(module, params, batch, chunk: int | None = None) -> tuple[jax.Array, jax.Array]:
    """Decoder-only: chosen and rejected in ONE sequence [prompt | chosen | rejected] per pair.

    The prompt is run once instead of twice: rejected tokens attend to the prompt and to earlier
    rejected tokens but not to the chosen block, and both completions take positions that continue
    the prompt, so every completion token sees exactly the context it would see alone. Only the
    positions that predict completion tokens reach the vocabulary head. With prompts of about the
    completions' length this removes a quarter of the tokens of a DPO forward/backward pass.
    Returns masked token log-probs (chosen [B, Cc], rejected [B, Cr]).
    """
    prompt, prompt_mask = batch["prompt"], batch["prompt_mask"]
    chosen, chosen_mask = batch["chosen"], batch["chosen_mask"]
    rejected, rejected_mask = batch["rejected"], batch["rejected_mask"]
    p, cc, cr = prompt.shape[1], chosen.shape[1], rejected.shape[1]
    tokens = jnp.concatenate([prompt, chosen, rejected], axis=1)
    valid = jnp.concatenate([prompt_mask, chosen_mask, rejected_mask], axis=1).astype(bool)
    n_prompt = prompt_mask.astype(jnp.int32).sum(-1, keepdims=True)
    positions = jnp.concatenate(
        [layers.positions_from_mask(prompt_mask), n_prompt + jnp.arange(cc), n_prompt + jnp.arange(cr)], axis=1
    )
    segment = jnp.concatenate([jnp.zeros(p, jnp.int32), jnp.ones(cc, jnp.int32), jnp.full(cr, 2, jnp.int32)])
    t = p + cc + cr
    allowed = jnp.tril(jnp.ones((t, t), bool)) & ((segment[None, :] == 0) | (segment[:, None] == segment[None, :]))
    mask = allowed[None] & valid[:, None, :]
    hidden, _ = module.apply({"params": params}, tokens, positions, mask, method="hidden_states")
    # Prompts are left-padded: the last prompt token (which predicts both first tokens) is at p - 1.
    index = jnp.concatenate([jnp.array([p - 1]), p + jnp.arange(cc - 1), jnp.array([p - 1]), p + cc + jnp.arange(cr - 1)])
    targets = jnp.concatenate([chosen, rejected], axis=1)
    logps = head_logprobs(module, params, jnp.take(hidden, index, axis=1), targets, chunk)
    logps = logps * jnp.concatenate([chosen_mask, rejected_mask], axis=1)
    return logps[:, :cc], logps[:, cc:]


def pair_inputs(batch) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Chosen and rejected completions interleaved along the batch ([2B], row 2i chosen, 2i+1
    rejected), sharing the prompt. Interleaving (not concatenating) keeps each pair on the device
    that holds its prompt, so the doubled batch needs no communication."""
    c = max(batch["chosen"].shape[1], batch["rejected"].shape[1])

    def interleave(a, b):
        return jnp.stack([a, b], axis=1).reshape((-1,) + a.shape[1:])

    completion = interleave(_pad_to(batch["chosen"], c), _pad_to(batch["rejected"], c))
    completion_mask = interleave(_pad_to(batch["chosen_mask"], c), _pad_to(batch["rejected_mask"], c))
    prompt = jnp.repeat(batch["prompt"], 2, axis=0)
    prompt_mask = jnp.repeat(batch["prompt_mask"], 2, axis=0)
    return prompt, prompt_mask, completion, completion_mask


def loss_mask(batch, side: str) -> jax.Array:
    """The tokens of `side` whose log-probs the DPO sums count (`<side>_loss_mask` where present)."""
    return batch.get(f"{side}_loss_mask", batch[f"{side}_mask"])


def pair_token_logprobs(module, params, batch, shared_prefix: bool | None = None,
                        chunk: int | None = None) -> tuple[jax.Array, jax.Array]:
    """Masked token log-probs of (chosen [B, Cc], rejected [B, Cr]) in one forward pass; where the
    batch has `chosen_loss_mask` / `rejected_loss_mask`, masked by those too.

    shared_prefix (default: for decoder-only models) runs the prompt once per pair; otherwise the
    pairs are laid out as a doubled batch through the family's `completion_logits`."""
    params = layers.compute_params(module, params)
    if shared_prefix is None:
        shared_prefix = is_decoder_only(module)
    if shared_prefix:
        chosen, rejected = shared_prefix_pair_logprobs(module, params, batch, chunk)
    else:
        prompt, prompt_mask, completion, completion_mask = pair_inputs(batch)
        logps = completion_token_logprobs(module, params, prompt, prompt_mask, completion, completion_mask, chunk)
        logps = logps.reshape(batch["prompt"].shape[0], 2, -1)
        chosen, rejected = logps[:, 0, : batch["chosen"].shape[1]], logps[:, 1, : batch["rejected"].shape[1]]
    if "chosen_loss_mask" in batch:  # `dpo.mask_calculator`, `dpo.count`: tokens the sums leave out
        chosen = chosen * loss_mask(batch, "chosen").astype(chosen.dtype)
        rejected = rejected * loss_mask(batch, "rejected").astype(rejected.dtype)
    return chosen, rejected


def reference_logps(module, ref_params, batch, chunk: int | None = None) -> tuple[jax.Array, jax.Array]:
    """Summed reference log-probs ([B], [B]) of chosen and rejected; never differentiated."""
    chosen, rejected = pair_token_logprobs(module, jax.lax.stop_gradient(ref_params), batch, chunk=chunk)
    return jax.lax.stop_gradient(chosen.sum(-1)), jax.lax.stop_gradient(rejected.sum(-1))


def dpo_terms(module, params, batch, cfg: DPOConfig, ref_chosen, ref_rejected, chunk: int | None = None):
    """Per-pair DPO quantities for one (micro-)batch: dict of [B] arrays and token sums."""
    chosen_logps, rejected_logps = pair_token_logprobs(module, params, batch, chunk=chunk)
    chosen_mask = loss_mask(batch, "chosen").astype(jnp.float32)
    rejected_mask = loss_mask(batch, "rejected").astype(jnp.float32)
    policy_chosen, policy_rejected = chosen_logps.sum(-1), rejected_logps.sum(-1)
    ipo = cfg.loss_type == "ipo"
    losses, chosen_rewards, rejected_rewards = dpo_loss(
        policy_chosen, policy_rejected, ref_chosen, ref_rejected,
        beta=cfg.beta, loss_type=cfg.loss_type, label_smoothing=cfg.label_smoothing,
        chosen_lengths=chosen_mask.sum(-1) if ipo else None,
        rejected_lengths=rejected_mask.sum(-1) if ipo else None,
    )
    valid = _valid(batch, policy_chosen.shape[0])
    chosen_nll, chosen_tokens = masked_nll(chosen_logps, chosen_mask * valid[:, None])
    return {
        "losses": losses,
        "chosen_rewards": chosen_rewards,
        "rejected_rewards": rejected_rewards,
        "policy_chosen": policy_chosen,
        "policy_rejected": policy_rejected,
        "valid": valid,
        "chosen_nll": chosen_nll,
        "chosen_tokens": chosen_tokens,
    }


# --------------------------------------------------------------------------------------------------
# micro-batching
# --------------------------------------------------------------------------------------------------
def split_microbatches(batch, grad_accum: int):
    """[B, ...] -> [A, B/A, ...] with micro-batch a = rows a, a+A, a+2A, ... (device-local rows)."""
    def split(x):
        b = x.shape[0]
        if b % grad_accum:
            raise ValueError(f"batch size {b} is not divisible by grad_accum={grad_accum}")
        return jnp.swapaxes(x.reshape((b // grad_accum, grad_accum) + x.shape[1:]), 0, 1)

    return jax.tree.map(split, batch)


def _accumulate(grad_fn, params, batch, grad_accum: int, constrain_grads, rng=None):
    """Sum of (grads, aux) of grad_fn over micro-batches (grad_fn already divides by global counts).
    With `rng` (dropout), grad_fn also takes micro-batch a's key `fold_in(rng, a)`."""
    def call(p, mb, a):
        return grad_fn(p, mb) if rng is None else grad_fn(p, mb, jax.random.fold_in(rng, a))

    if grad_accum == 1:
        (_, aux), grads = call(params, batch, 0)
        return constrain_grads(grads), aux
    micro = split_microbatches(batch, grad_accum)

    def body(carry, x):
        mb, a = x
        g_acc, a_acc = carry
        (_, aux), grads = call(params, mb, a)
        g_acc = constrain_grads(jax.tree.map(jnp.add, g_acc, grads))
        return (g_acc, jax.tree.map(jnp.add, a_acc, aux)), None

    first = jax.tree.map(lambda x: x[0], micro)
    aux_shape = jax.eval_shape(lambda p, b: call(p, b, 0)[0][1], params, first)
    zeros_g = constrain_grads(jax.tree.map(jnp.zeros_like, params))
    zeros_a = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), aux_shape)
    (grads, aux), _ = jax.lax.scan(body, (zeros_g, zeros_a), (micro, jnp.arange(grad_accum)))
    return grads, aux


def _apply_update(state: TrainState, grads, optimizer, lr_schedule):
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    lr = lr_schedule(state.step) if lr_schedule is not None else jnp.nan
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    return new_state, {"grad_norm": grad_norm, "learning_rate": jnp.asarray(lr, jnp.float32)}


# --------------------------------------------------------------------------------------------------
# jit with shardings
# --------------------------------------------------------------------------------------------------
# XLA:CPU's default scheduler orders independent work for thread concurrency, which materialises
# every layer gradient's accumulator before the forward pass; the memory-optimised scheduler starts
# them with the backward pass: the SmolLM2 DPO step's temporaries go from 1.08 to 0.88 GB at the
# same step time (BENCHMARKS.md, "Training steps"). Other backends keep their defaults.
CPU_COMPILER_OPTIONS = {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}


def _signature(args) -> tuple:
    """What a compiled program is specialised to: tree structure, abstract values and shardings."""
    leaves, treedef = jax.tree.flatten(args)
    return treedef, tuple((jax.typeof(x), getattr(x, "sharding", None)) for x in leaves)


class Step:
    """A jitted step plus the layout (mesh, logical rules) its trace needs.

    Call as `step(state, batch)` (or `step(state, batch, ref_params)` for the in-step DPO
    reference). Each new argument signature (shapes, dtypes, shardings) is compiled ahead of time
    and kept in `step.programs`, so a stage shows how many programs it compiled; between the
    compile and the first execution the compiler's freed heap goes back to the kernel
    (`startup.release_free_heap`), which keeps it out of the step's peak resident memory.
    `step.jitted` is the underlying `jax.jit` object.
    """

    def __init__(self, fn: Callable, layout: Layout, jitted):
        self.fn, self.layout, self.jitted = fn, layout, jitted
        self.programs: dict[tuple, Any] = {}
        mesh = layout.mesh
        platform = jax.default_backend() if mesh is None else mesh.devices.flat[0].platform
        self.compiler_options = CPU_COMPILER_OPTIONS if platform == "cpu" else {}

    def __call__(self, *args):
        key = _signature(args)
        program = self.programs.get(key)
        if program is None:
            program = self.lower(*args).compile(compiler_options=self.compiler_options)
            self.programs[key] = program
            startup.release_free_heap()
        return program(*args)

    def lower(self, *args):
        with self.layout.activation_rules():
            return self.jitted.lower(*args)


def _batch_sharding(layout: Layout) -> NamedSharding:
    # One prefix sharding for every leaf of the batch dict: leading axis = `batch`.
    return layout.batch(1)


def _jit_step(fn, *, layout: Layout, state_shardings, ref_shardings, n_args: int, donate: bool) -> Step:
    donate_argnums = (0,) if donate else ()
    if layout.mesh is None:
        return Step(fn, layout, jax.jit(fn, donate_argnums=donate_argnums))
    if state_shardings is None:
        raise ValueError("a sharded step needs state_shardings (see training.state_shardings)")
    replicated = layout.replicated()
    in_sh = [state_shardings, _batch_sharding(layout)]
    if n_args == 3:
        in_sh.append(ref_shardings if ref_shardings is not None else state_shardings.params)
    jitted = jax.jit(
        fn, in_shardings=tuple(in_sh), out_shardings=(state_shardings, replicated), donate_argnums=donate_argnums
    )
    return Step(fn, layout, jitted)


def _grad_constraint(layout: Layout, state_shardings):
    if layout.mesh is None or state_shardings is None:
        return lambda g: g
    return lambda g: jax.lax.with_sharding_constraint(g, state_shardings.params)


def _batch_constraint(layout: Layout):
    if layout.mesh is None:
        return lambda b: b
    sh = _batch_sharding(layout)
    return lambda b: jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, sh), b)


# --------------------------------------------------------------------------------------------------
# SFT
# --------------------------------------------------------------------------------------------------
def with_dropout(module, rate: float):
    """The family module with training-time dropout at `rate` (its `dropout_rate` field); the module
    it came from, which evaluation, scoring, sampling and DPO use, keeps none. Rate 0: `module`."""
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"dropout rate must be in [0, 1), got {rate!r} (config field model.dropout)")
    if not rate:
        return module
    if "dropout_rate" not in {f.name for f in dataclasses.fields(module)}:
        raise ValueError(f"{type(module).__name__} has no dropout_rate field: set model.dropout=0")
    return module.clone(dropout_rate=float(rate))


def make_sft_step(
    module,
    optimizer: optax.GradientTransformation,
    *,
    lr_schedule: Callable | None = None,
    grad_accum: int = 1,
    layout: Layout = Layout(),
    state_shardings: TrainState | None = None,
    donate: bool = True,
    logits_chunk: int | None = None,
    dropout: float = 0.0,
) -> Step:
    """step(state, batch) -> (state, metrics): masked NLL over target tokens, mean over the global
    batch's target tokens. Metrics: loss, tokens (target tokens), grad_norm, learning_rate.
    logits_chunk: compute the vocab head this many positions at a time (decoder-only; saves memory).
    dropout: training-time dropout rate (`with_dropout`); micro-batch a of a step draws its masks
    from `fold_in(state.step_rng(), a)`, so a step is a pure function of (state, batch) and a resumed
    run repeats them. Rate 0 traces exactly the step without dropout."""
    check_logits_chunk(logits_chunk)
    train_module = with_dropout(module, dropout)
    constrain_grads = _grad_constraint(layout, state_shardings)
    constrain_batch = _batch_constraint(layout)

    def step(state: TrainState, batch):
        batch = constrain_batch(batch)
        valid = _valid(batch, batch["completion"].shape[0])
        total_tokens = (batch["completion_mask"].astype(jnp.float32) * valid[:, None]).sum()
        denom = jnp.maximum(total_tokens, 1.0)

        def loss_fn(params, mb, rng=None):
            rngs = None if rng is None else {"dropout": rng}
            logps, mask = sft_token_logprobs(train_module, params, mb, logits_chunk, rngs)
            nll, _ = masked_nll(logps, mask)
            return nll / denom, {"nll": nll}

        grads, aux = _accumulate(jax.value_and_grad(loss_fn, has_aux=True), state.params, batch, grad_accum,
                                 constrain_grads, rng=state.step_rng() if dropout else None)
        state, extra = _apply_update(state, grads, optimizer, lr_schedule)
        metrics = {"loss": aux["nll"] / denom, "tokens": total_tokens, **extra}
        return state, metrics

    return _jit_step(step, layout=layout, state_shardings=state_shardings, ref_shardings=None,
                     n_args=2, donate=donate)


def make_sft_eval_step(module, *, layout: Layout = Layout(), param_shardings=None,
                       logits_chunk: int | None = None) -> Step:
    """eval(params, batch) -> {"nll_sum", "tokens"} (sum them over batches; loss = nll_sum / tokens)."""
    check_logits_chunk(logits_chunk)
    def fn(params, batch):
        logps, mask = sft_token_logprobs(module, params, batch, logits_chunk)
        nll, tokens = masked_nll(logps, mask)
        return {"nll_sum": nll, "tokens": tokens}

    if layout.mesh is None:
        return Step(fn, layout, jax.jit(fn))
    return Step(fn, layout, jax.jit(fn, in_shardings=(param_shardings, _batch_sharding(layout))))


# --------------------------------------------------------------------------------------------------
# DPO
# --------------------------------------------------------------------------------------------------
DPO_METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
               "logps/chosen", "logps/rejected", "grad_norm", "learning_rate")


def _dpo_sums(t, cfg: DPOConfig, n_pairs, n_chosen_tokens):
    """Per-micro-batch loss (already divided by global counts) and metric sums."""
    v = t["valid"]
    pair_loss = (t["losses"] * v).sum() / n_pairs
    loss = pair_loss
    if cfg.rpo_alpha:
        loss = loss + cfg.rpo_alpha * t["chosen_nll"] / n_chosen_tokens
    sums = {
        "loss": loss,
        "rewards/chosen": (t["chosen_rewards"] * v).sum(),
        "rewards/rejected": (t["rejected_rewards"] * v).sum(),
        "rewards/margins": ((t["chosen_rewards"] - t["rejected_rewards"]) * v).sum(),
        "rewards/accuracies": ((t["chosen_rewards"] > t["rejected_rewards"]).astype(jnp.float32) * v).sum(),
        "logps/chosen": (jax.lax.stop_gradient(t["policy_chosen"]) * v).sum(),
        "logps/rejected": (jax.lax.stop_gradient(t["policy_rejected"]) * v).sum(),
        "nll": jax.lax.stop_gradient(t["chosen_nll"]),
    }
    return loss, sums


def _finish_dpo_metrics(sums, n_pairs, n_chosen_tokens):
    out = {"loss": sums["loss"]}
    for k in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
              "logps/rejected"):
        out[k] = sums[k] / n_pairs
    out["nll"] = sums["nll"] / n_chosen_tokens
    return out


def _dpo_counts(batch):
    valid = _valid(batch, batch["prompt"].shape[0])
    n_pairs = jnp.maximum(valid.sum(), 1.0)
    n_chosen = jnp.maximum((loss_mask(batch, "chosen").astype(jnp.float32) * valid[:, None]).sum(), 1.0)
    return n_pairs, n_chosen


def make_dpo_step(
    module,
    optimizer: optax.GradientTransformation,
    cfg: DPOConfig = DPOConfig(),
    *,
    lr_schedule: Callable | None = None,
    grad_accum: int = 1,
    layout: Layout = Layout(),
    state_shardings: TrainState | None = None,
    ref_shardings=None,
    donate: bool = True,
    logits_chunk: int | None = None,
) -> Step:
    """DPO train step.

    cfg.reference == "in_step":     step(state, batch, ref_params) -> (state, metrics); the
        reference log-probs are computed in the same program (not differentiated, not donated).
    cfg.reference == "precomputed": step(state, batch) -> (state, metrics); the batch carries
        ref_chosen_logps / ref_rejected_logps [B] and only the policy is held.
    Metrics: DPO_METRICS (+ nll of the chosen completions, tokens).
    Decoder-only models run each pair as one [prompt | chosen | rejected] sequence (the prompt
    once); logits_chunk bounds the vocab-sized logits held at once (see head_logprobs).
    """
    check_logits_chunk(logits_chunk)
    constrain_grads = _grad_constraint(layout, state_shardings)
    constrain_batch = _batch_constraint(layout)

    def core(state: TrainState, batch, ref_params):
        batch = constrain_batch(batch)
        n_pairs, n_chosen = _dpo_counts(batch)
        if ref_params is not None:
            # Reference log-probs for the whole batch up front (a forward pass, no residuals kept).
            ref_c, ref_r = reference_logps(module, ref_params, batch, logits_chunk)
            batch = dict(batch, ref_chosen_logps=ref_c, ref_rejected_logps=ref_r)

        def loss_fn(params, mb):
            t = dpo_terms(module, params, mb, cfg, mb["ref_chosen_logps"], mb["ref_rejected_logps"], logits_chunk)
            return _dpo_sums(t, cfg, n_pairs, n_chosen)

        grads, sums = _accumulate(jax.value_and_grad(loss_fn, has_aux=True), state.params, batch, grad_accum,
                                  constrain_grads)
        state, extra = _apply_update(state, grads, optimizer, lr_schedule)
        tokens = (batch["chosen_mask"].sum() + batch["rejected_mask"].sum()).astype(jnp.float32)
        return state, {**_finish_dpo_metrics(sums, n_pairs, n_chosen), **extra, "tokens": tokens}

    if cfg.reference == "in_step":
        def step(state, batch, ref_params):
            return core(state, batch, ref_params)
        n_args = 3
    else:
        def step(state, batch):
            return core(state, batch, None)
        n_args = 2
    return _jit_step(step, layout=layout, state_shardings=state_shardings, ref_shardings=ref_shardings,
                     n_args=n_args, donate=donate)


def make_dpo_eval_step(module, cfg: DPOConfig = DPOConfig(), *, layout: Layout = Layout(),
                       param_shardings=None, logits_chunk: int | None = None) -> Step:
    """eval(params, batch, ref_params=None) -> sums of the DPO metrics and the pair count.
    Pass ref_params=None when the batch carries ref_*_logps."""
    check_logits_chunk(logits_chunk)
    def fn(params, batch, ref_params):
        if ref_params is not None:
            ref_c, ref_r = reference_logps(module, ref_params, batch, logits_chunk)
        else:
            ref_c, ref_r = batch["ref_chosen_logps"], batch["ref_rejected_logps"]
        t = dpo_terms(module, params, batch, cfg, ref_c, ref_r, logits_chunk)
        _, sums = _dpo_sums(t, cfg, 1.0, 1.0)
        sums["loss"] = (t["losses"] * t["valid"]).sum()
        sums["pairs"] = t["valid"].sum()
        sums["chosen_tokens"] = t["chosen_tokens"]
        return sums

    if layout.mesh is None:
        return Step(fn, layout, jax.jit(fn))
    bs = _batch_sharding(layout)
    return Step(fn, layout, jax.jit(fn, in_shardings=(param_shardings, bs, param_shardings)))


def make_reference_fn(module, *, layout: Layout = Layout(), param_shardings=None,
                      logits_chunk: int | None = None) -> Step:
    """ref(params, batch) -> (ref_chosen_logps [B], ref_rejected_logps [B]): run once per DPO stage
    over the pairs (or take the sampler's token log-probs) and feed them to the precomputed step."""
    check_logits_chunk(logits_chunk)
    fn = functools.partial(reference_logps, module, chunk=logits_chunk)
    if layout.mesh is None:
        return Step(fn, layout, jax.jit(fn))
    return Step(fn, layout, jax.jit(fn, in_shardings=(param_shardings, _batch_sharding(layout))))
