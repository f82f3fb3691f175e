"""How a model's parameters and widths split by a `Layout`: per-device bytes from each leaf's
logical axes, read on an abstract mesh (no devices), so a laptop plans any pod size."""

from __future__ import annotations

import dataclasses
import math
import flax.linen as nn
import jax

from dpost import sharding
from dpost.sharding import Layout
from dpost.models import sources
from dpost.models.registry import get_family
from dpost.models.shapes import ModelShapes


def dims(family: str, cfg) -> dict:
    """Family-neutral shape numbers."""
    if family == "llama":
        return dict(d=cfg.hidden_size, f=cfg.intermediate_size, heads=cfg.num_heads, kv_heads=cfg.num_kv_heads,
                    head_dim=cfg.head_dim, vocab=cfg.vocab_size, layers=cfg.num_layers, dec_layers=0)
    return dict(d=cfg.d_model, f=cfg.d_ff, heads=cfg.num_heads, kv_heads=cfg.num_heads, head_dim=cfg.d_kv,
                vocab=cfg.vocab_size, layers=cfg.num_layers, dec_layers=cfg.num_decoder_layers)


def shards(logical: str, dim: int, layout: Layout) -> int:
    """How many ways a dimension of size `dim` with logical name `logical` is split by the layout."""
    return dim // layout.sharding((logical,), (dim,)).shard_shape((dim,))[0]


@dataclasses.dataclass(frozen=True)
class ParamInfo:
    count: int  # parameters
    bytes_fp32: int  # whole model, fp32
    per_device: int  # fp32 bytes of this device's shards
    layer_gathered: dict  # stack name -> fp32 bytes of one layer after the fsdp all-gather (per device)
    layers_gathered: int  # all scanned layers after the fsdp all-gather (per device)
    rest_gathered: int  # non-layer params (embedding, head, norms) after the fsdp all-gather


def param_info(model: ModelShapes, layout: Layout) -> ParamInfo:
    """Per-device parameter bytes from each leaf's logical axes, laid out by `layout` (its mesh may
    be abstract)."""
    boxed = sources.abstract_params(get_family(model.family), model.config)
    shapes = nn.unbox(boxed)
    names = nn.get_partition_spec(boxed)
    gathered = layout.on(sharding.abstract_mesh({**dict(layout.mesh.shape), "fsdp": 1, "data": 1}))
    leaves = jax.tree_util.tree_flatten_with_path(shapes)[0]
    specs = jax.tree.leaves(names, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    count = per_device = rest = layers_total = 0
    layer: dict[str, int] = {}
    for (path, x), spec_names in zip(leaves, specs, strict=True):
        key = tuple(str(getattr(k, "key", k)) for k in path)
        axes = tuple(spec_names)
        count += math.prod(x.shape)
        per_device += math.prod(layout.sharding(axes, x.shape).shard_shape(x.shape)) * 4
        full = math.prod(gathered.sharding(axes, x.shape).shard_shape(x.shape)) * 4
        if "layers" in axes:
            stack = "/".join(str(k) for k in key[: key.index("layers")]) if "layers" in key else "layers"
            layer[stack or "layers"] = layer.get(stack or "layers", 0) + full // x.shape[axes.index("layers")]
            layers_total += full
        else:
            rest += full
    return ParamInfo(count, count * 4, per_device, layer, layers_total, rest)
