"""Device mesh and logical-axis sharding rules: the one place that maps names to mesh axes.

Every parameter and key activation carries logical axis names (`vocab`, `embed`, `heads`, ...).
`DEFAULT_RULES` maps them to the mesh axes `data`, `fsdp` and `tensor` (t5x/MaxText style); a config
may override the table (`config.sharding.rules`). A mesh axis that does not divide a parameter's
dimension is dropped for that parameter (e.g. 3 KV heads on a 2-way `tensor` axis are replicated).

A `Layout` is the mesh and the rules together, made once per run (`Layout.from_config`) and passed
to whatever places params or batches or traces sharded code (t5x's partitioner plays this role):
`layout.params(boxed)`, `layout.batch(ndim)`, `with layout.activation_rules(): ...`. `Layout()` is
one device: nothing is placed or constrained.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AbstractMesh, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axis (or tuple of mesh axes, or None = replicated).
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    # parameters
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("relpos_buckets", None),
    ("layers", None),
    # activations
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
)


def mesh_shape(shape: Mapping[str, int] | None = None, num_devices: int | None = None) -> dict[str, int]:
    """{data, fsdp, tensor} sizes of `shape`; one size may be -1 meaning "all remaining devices" of
    `num_devices` (default jax.device_count()). Missing axes are 1."""
    shape = dict(shape or {"data": -1})
    unknown = set(shape) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"unknown mesh axes {sorted(unknown)}; expected a subset of {MESH_AXES}")
    sizes = {axis: int(shape.get(axis, 1)) for axis in MESH_AXES}
    free = [axis for axis, size in sizes.items() if size == -1]
    if len(free) > 1:
        raise ValueError(f"mesh {shape}: at most one axis may be -1")
    if free:
        num_devices = jax.device_count() if num_devices is None else num_devices
        known = math.prod(size for size in sizes.values() if size != -1)
        if num_devices % known:
            raise ValueError(f"mesh {shape}: {num_devices} devices are not divisible by {known}")
        sizes[free[0]] = num_devices // known
    if any(size < 1 for size in sizes.values()):
        raise ValueError(f"mesh {shape}: sizes must be positive")
    return sizes


def make_mesh(shape: Mapping[str, int] | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Mesh with axes (data, fsdp, tensor) over `devices` (default all); see `mesh_shape`."""
    devices = list(devices if devices is not None else jax.devices())
    sizes = mesh_shape(shape, len(devices))
    if math.prod(sizes.values()) != len(devices):
        raise ValueError(f"mesh {sizes} needs {math.prod(sizes.values())} devices, have {len(devices)}")
    return Mesh(np.asarray(devices).reshape(tuple(sizes.values())), MESH_AXES)


def abstract_mesh(sizes: Mapping[str, int]) -> AbstractMesh:
    """A mesh of `sizes` without devices: shardings and shard shapes for a pod this host is not on."""
    return AbstractMesh(tuple(int(sizes[axis]) for axis in MESH_AXES), MESH_AXES)


def rules_from_config(rules: Any | None) -> tuple[tuple[str, Any], ...]:
    """Accepts a sequence of (name, axes) pairs or a mapping; None gives DEFAULT_RULES."""
    if rules is None:
        return DEFAULT_RULES
    items = rules.items() if hasattr(rules, "items") else rules
    return tuple((str(name), tuple(axes) if isinstance(axes, list) else axes) for name, axes in items)


def _fit_spec(spec: PartitionSpec, shape: Sequence[int], mesh: Mesh) -> PartitionSpec:
    """Drops mesh axes that do not evenly divide the dimension they would shard."""
    fitted = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        if axes is None:
            fitted.append(None)
            continue
        names = axes if isinstance(axes, tuple) else (axes,)
        kept = []
        for name in names:
            if dim % (math.prod(mesh.shape[a] for a in kept) * mesh.shape[name]) == 0:
                kept.append(name)
        fitted.append(tuple(kept) if len(kept) > 1 else (kept[0] if kept else None))
    return PartitionSpec(*fitted)


def logical_to_sharding(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules) -> NamedSharding:
    spec = nn.logical_to_mesh_axes(tuple(axes), rules_from_config(rules))
    return NamedSharding(mesh, _fit_spec(spec, shape, mesh))


def param_shardings(boxed_abstract: Any, mesh: Mesh, rules=None) -> Any:
    """Shardings for every parameter from its logical axis names (boxed abstract params in)."""
    specs = nn.get_partition_spec(boxed_abstract)  # logical names per leaf
    shapes = nn.unbox(boxed_abstract)
    return jax.tree.map(
        lambda spec, x: logical_to_sharding(tuple(spec), x.shape, mesh, rules),
        specs,
        shapes,
        is_leaf=lambda s: isinstance(s, PartitionSpec),
    )


def batch_sharding(mesh: Mesh, ndim: int, rules=None) -> NamedSharding:
    """Sharding for a host batch array whose leading axis is `batch`."""
    spec = nn.logical_to_mesh_axes(("batch",) + (None,) * (ndim - 1), rules_from_config(rules))
    return NamedSharding(mesh, spec)


@contextlib.contextmanager
def activation_rules(mesh: Mesh | None, rules=None):
    """Context under which `nn.with_logical_constraint` inside models resolves against `mesh`."""
    if mesh is None:
        yield
        return
    with mesh, nn.logical_axis_rules(rules_from_config(rules)):
        yield


@dataclasses.dataclass(frozen=True)
class Layout:
    """A mesh (None: one device; an AbstractMesh: planning for devices this host does not have) and
    the logical-axis rules that map parameter and activation names onto it. Hashable, so compiled
    programs can specialise on it."""

    mesh: Mesh | AbstractMesh | None = None
    rules: Any = DEFAULT_RULES

    def __post_init__(self):
        object.__setattr__(self, "rules", rules_from_config(self.rules))

    @classmethod
    def from_config(cls, config, devices: Sequence[jax.Device] | None = None) -> "Layout":
        """`config.mesh` over `devices` (default all) with `config.sharding.rules`."""
        return cls(make_mesh(dict(config.mesh), devices), config.sharding.rules)

    def on(self, mesh: Mesh | None) -> "Layout":
        """The same rules on another mesh (e.g. a host's own devices)."""
        return dataclasses.replace(self, mesh=mesh)

    @property
    def batch_axes(self) -> tuple[str, ...]:
        """The mesh axes the leading `batch` axis of activations and host batches is split over."""
        if self.mesh is None:
            return ()
        axes = dict(self.rules).get("batch")
        return tuple(a for a in (axes if isinstance(axes, tuple) else (axes,)) if a is not None)

    @property
    def batch_shards(self) -> int:
        return math.prod(self.mesh.shape[a] for a in self.batch_axes) if self.mesh is not None else 1

    def sharding(self, axes: Sequence[str | None], shape: Sequence[int]) -> NamedSharding:
        return logical_to_sharding(axes, shape, self.mesh, self.rules)

    def params(self, boxed_abstract: Any) -> Any:
        """Shardings of every parameter (boxed abstract params in); None on one device."""
        return param_shardings(boxed_abstract, self.mesh, self.rules) if self.mesh is not None else None

    def batch(self, ndim: int) -> NamedSharding | None:
        """Sharding of an array whose leading axis is `batch`; None on one device."""
        return batch_sharding(self.mesh, ndim, self.rules) if self.mesh is not None else None

    def replicated(self) -> NamedSharding | None:
        return NamedSharding(self.mesh, PartitionSpec()) if self.mesh is not None else None

    def activation_rules(self):
        """Context under which `nn.with_logical_constraint` inside models resolves on this layout."""
        return activation_rules(self.mesh, self.rules)


def as_layout(layout: Layout | None = None, mesh: Mesh | None = None) -> Layout:
    """The public entry points' `layout=` or, kept for compatibility, `mesh=` (with DEFAULT_RULES)."""
    if layout is not None and mesh is not None:
        raise ValueError("pass layout= or mesh=, not both (a layout holds its mesh)")
    return layout if layout is not None else Layout(mesh)

