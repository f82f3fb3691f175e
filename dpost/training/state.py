"""TrainState: the pytree a train step consumes and returns (and a checkpoint holds).

Params are fp32 masters; `opt_state` mirrors them (AdamW's mu/nu) and is sharded like them;
`step` counts optimizer updates; `rng` is a raw uint32[2] key (plain array, so it checkpoints like
any other leaf) from which per-step keys are derived with `fold_in(rng, step)` (the SFT step's
dropout masks), so a restored state draws the masks an uninterrupted run would have.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax

from dpost.sharding import Layout



@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer updates applied so far
    params: Any
    opt_state: Any
    rng: jax.Array  # uint32[2]

    def step_rng(self) -> jax.Array:
        return jax.random.fold_in(self.rng, self.step)


def _as_rng(rng: int | jax.Array) -> jax.Array:
    if isinstance(rng, int):
        return jax.random.PRNGKey(rng)
    if jnp.issubdtype(getattr(rng, "dtype", None), jax.dtypes.prng_key):
        return jax.random.key_data(rng)
    return jnp.asarray(rng, jnp.uint32)


def state_shardings(params_shardings: Any, optimizer: optax.GradientTransformation, abstract_params: Any,
                    layout: Layout):
    """TrainState of shardings: optimizer moments follow their parameter; scalars are replicated.

    abstract_params: unboxed pytree of ShapeDtypeStruct (or arrays) with the params' structure.
    """
    replicated = layout.replicated()
    abstract_opt = jax.eval_shape(optimizer.init, abstract_params)
    opt_shardings = optax.tree_map_params(
        optimizer,
        lambda _, s: s,
        abstract_opt,
        params_shardings,
        transform_non_params=lambda _: replicated,
        is_leaf=lambda x: isinstance(x, jax.sharding.Sharding),
    )
    return TrainState(step=replicated, params=params_shardings, opt_state=opt_shardings, rng=replicated)


def abstract_state(optimizer: optax.GradientTransformation, abstract_params: Any, shardings: TrainState | None = None):
    """TrainState of ShapeDtypeStruct (with shardings when given): the target of a checkpoint restore."""
    abstract_params = nn.unbox(abstract_params)
    state = TrainState(
        step=jax.ShapeDtypeStruct((), jnp.int32),
        params=jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), abstract_params),
        opt_state=jax.eval_shape(optimizer.init, abstract_params),
        rng=jax.ShapeDtypeStruct((2,), jnp.uint32),
    )
    if shardings is None:
        return state
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)


def create_train_state(
    params: Any,
    optimizer: optax.GradientTransformation,
    rng: int | jax.Array = 0,
    shardings: TrainState | None = None,
) -> TrainState:
    """A fresh TrainState at step 0. Params are *copied*, so the caller's arrays (e.g. the DPO
    reference, which starts equal to the policy) survive the donation of the train state."""
    rng = _as_rng(rng)

    def init(params, rng):
        params = jax.tree.map(jnp.copy, params)
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params), rng=rng)

    if shardings is None:
        return jax.jit(init)(params, rng)
    return jax.jit(init, out_shardings=shardings)(params, rng)
