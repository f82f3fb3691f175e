"""Building blocks shared by the model families: parameters with logical axes, norms, masks.

Every parameter is created through `param_with_axes` so its logical axis names travel with it;
`dpost.sharding` maps those names to mesh axes with one rules table.
"""

from __future__ import annotations

import functools
import logging
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = jnp.dtype

NEG_INF = -1e9  # Large negative (not -inf) so fully masked rows stay finite in fp32 and bf16.

# Attention implementations (model config field `attention`): "fused" hands training, scoring and
# prefill attention to `jax.nn.dot_product_attention`; "einsum" spells it out (scores, mask,
# softmax, weighted sum), which attention-probability dropout needs.
ATTENTIONS = ("fused", "einsum")


def check_attention(name: str) -> None:
    if name not in ATTENTIONS:
        raise ValueError(f"attention={name!r}: expected one of {ATTENTIONS}")


# What each training layer keeps for the backward pass (`model.remat`):
#   none  everything (no recomputation)
#   full  only the layer input; the whole layer is recomputed in the backward pass
#   dots  the outputs of the weight matmuls (projections and MLP); attention scores, softmax,
#         norms and activations are recomputed. jax's `dots_with_no_batch_dims_saveable`: the
#         attention contractions carry batch dimensions, so their [T, S]-sized outputs are not
#         kept (`checkpoint_dots` would keep them: memory quadratic in the sequence length).
REMATS = ("none", "full", "dots")


def remat_name(value) -> str:
    """`model.remat` as one of REMATS; booleans (configs and checkpoints before the policies) read
    as True -> full, False -> none."""
    if isinstance(value, bool):
        return "full" if value else "none"
    if value not in REMATS:
        raise ValueError(f"remat={value!r}: expected one of {REMATS} (or True / False)")
    return value


def remat_layer(layer_cls, remat: str, scanned: bool = True):
    """The linen layer class wrapped for the remat policy (unchanged for none). Unscanned layers
    need CSE prevention, or XLA merges the recomputation back into the forward pass."""
    policies = {"full": jax.checkpoint_policies.nothing_saveable,
                "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}
    if remat == "none":
        return layer_cls
    return nn.remat(layer_cls, prevent_cse=not scanned, policy=policies[remat])


def unrolled_layers(module: nn.Module, layer: nn.Module, carry, *args, with_index: bool = False):
    """`scan_layers=False`: the unbound `layer` applied in a Python loop over slices of `module`'s
    stacked `layers` params (the scan's layout, so checkpoints and sharding do not change). The
    carry threads through; `args` go to every layer, followed by the layer's index when
    `with_index`. Layer i draws its dropout rng from `module` (masks differ from the scan's split)."""
    stacked = module.variables["params"]["layers"]
    for i in range(jax.tree.leaves(stacked)[0].shape[0]):
        rngs = {"dropout": module.make_rng("dropout")} if layer.dropout_rate else {}
        index = (i,) if with_index else ()
        carry = layer.apply({"params": layer_params(stacked, i)}, carry, *args, *index, rngs=rngs)[0]
    return carry


def fused_attention(q, k, v, *, mask, bias=None, scale: float | None = None) -> jax.Array:
    """q [B, T, N, Dh], k/v [B, S, K, Dh] (K divides N: grouped-query), mask bool and bias fp32,
    both broadcastable to [B, N, T, S] -> [B, T, N, Dh].

    On GPU, bf16/fp16 attention over more than one query goes to cuDNN's flash attention (JAX's
    `implementation=None` still means XLA there); mask and bias become one additive bias in the
    compute dtype (so its numbers should stay within bf16 rounding of the einsum path; checked on CPU
    with a stand-in for cuDNN, not yet on a GPU). Shapes cuDNN refuses (JAX says so while tracing)
    and every other platform take XLA's implementation, which keeps the scores and softmax in fp32."""
    k, v = k.astype(q.dtype), v.astype(q.dtype)
    if use_cudnn_attention(q):
        t = q.shape[1]
        # cuDNN wants the bias's query axis spelled out (a padding mask broadcasts it).
        mask = jnp.broadcast_to(mask, (mask.shape[0], mask.shape[1], t, k.shape[1]))
        try:
            return jax.nn.dot_product_attention(q, k, v, bias=None if bias is None else bias.astype(q.dtype),
                                                mask=mask, scale=scale, implementation="cudnn")
        except (NotImplementedError, ValueError) as err:
            _warn_cudnn_refused(str(err))
    return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, scale=scale, implementation="xla")


def use_cudnn_attention(q) -> bool:
    """Whether `fused_attention` tries cuDNN: a GPU backend, a half-precision compute dtype and
    more than one query position (single-query decode steps stay on XLA)."""
    return jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16) and q.shape[1] > 1


@functools.cache  # once per reason: tracing repeats for every program
def _warn_cudnn_refused(reason: str) -> None:
    logging.warning("fused attention: cuDNN refused this shape (%s); using XLA's implementation", reason)


def param_with_axes(module: nn.Module, name: str, init, shape: Sequence[int], axes: Sequence[str]):
    """Creates an fp32 master parameter annotated with logical axis names."""
    return module.param(name, nn.with_logical_partitioning(init, tuple(axes)), tuple(shape), jnp.float32)


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """Logical sharding constraint on an activation (a no-op outside a mesh/rules context)."""
    return nn.with_logical_constraint(x, tuple(axes))


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in fp32 (as transformers' LlamaRMSNorm / T5LayerNorm)."""

    eps: float
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = param_with_axes(self, "scale", nn.initializers.ones, (x.shape[-1],), ("embed",))
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (scale * y.astype(self.dtype)).astype(self.dtype)


def dropout(rate: float) -> nn.Dropout:
    """flax Dropout, always active: only training builds modules with a rate > 0 (and a "dropout"
    rng); at rate 0 it returns its input untouched and asks for no rng."""
    return nn.Dropout(rate, deterministic=False)


def causal_padding_mask(token_mask: jax.Array) -> jax.Array:
    """[B, T] validity -> [B, T, T] attention mask: causal, padding keys hidden."""
    t = token_mask.shape[1]
    causal = jnp.tril(jnp.ones((t, t), dtype=bool))
    mask = causal[None] & token_mask[:, None, :].astype(bool)
    return mask


def positions_from_mask(token_mask: jax.Array) -> jax.Array:
    """Position ids that skip left padding: 0 at the first real token."""
    return jnp.maximum(jnp.cumsum(token_mask.astype(jnp.int32), axis=-1) - 1, 0)


def repeat_batch(tree, n: int, axis: int = 0):
    """Repeats every leaf of `tree` n times along its batch axis (sample expansion)."""
    if n == 1:
        return tree
    return jax.tree.map(lambda x: jnp.repeat(x, n, axis=axis), tree)


def split_layers(stacked):
    """Scanned layer params (leading `layers` axis) -> a tuple of per-layer pytrees (separate buffers)."""
    num_layers = jax.tree.leaves(stacked)[0].shape[0]
    return tuple(jax.tree.map(lambda a: a[i], stacked) for i in range(num_layers))


def layer_params(layers_params, i: int):
    """Layer i's params from either layout: split (a tuple, see `split_layers`) or stacked."""
    if isinstance(layers_params, (tuple, list)):
        return layers_params[i]
    return jax.tree.map(lambda a: a[i], layers_params)


def cast_matrices(tree, dtype, keep: Sequence[str] = ()):
    """Every parameter of two or more dimensions cast to the compute `dtype`, except those whose
    name is in `keep`. For the sampler's decode copy of the params: each matmul casts its weight to
    the compute dtype anyway, so casting once beforehand gives the same numbers while every decode
    step reads half the bytes in bf16. Vectors (norm scales) stay fp32, as they are used in fp32."""

    def cast(path, x):
        name = getattr(path[-1], "key", None) if path else None
        return x.astype(dtype) if x.ndim >= 2 and name not in keep else x

    return jax.tree_util.tree_map_with_path(cast, tree)


def compute_params(module, params):
    """The params a training forward pass multiplies with: matrices cast once to the module's
    compute dtype (the values each matmul's own cast gives), with gradients flowing back to the
    fp32 masters through the cast. Casting the tree up front, rather than inside the layer scan,
    lets the scan slice half-size weights. Kept fp32: the module's FP32_PARAMS and the token
    embedding, whose gradient sums many gathered rows (and the tied head's) and must add in fp32.
    A no-op in fp32."""
    dtype = module.config.compute_dtype
    if dtype == jnp.float32:
        return params
    return cast_matrices(params, dtype, keep=("embed",) + tuple(getattr(module, "FP32_PARAMS", ())))
