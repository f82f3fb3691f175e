"""Family-independent weight conversion: rule tables map external tensors to dpost params.

A family lists one `TensorRule` per dpost parameter. Import reads external tensors one at a time
(by name, through a `getter`), converts them on the host and places each directly into its
sharding, so a large model never has to sit whole on one device. Export runs the rules backwards.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping

import jax
import numpy as np
from flax import traverse_util


def _identity(x):
    return x


@dataclasses.dataclass(frozen=True)
class TensorRule:
    path: tuple[str, ...]  # dpost parameter path
    name: str  # external tensor name; `{layer}` is expanded when stacked
    to_dpost: Callable[[np.ndarray], np.ndarray] = _identity
    to_external: Callable[[np.ndarray], np.ndarray] = _identity
    stacked: bool = False  # one external tensor per layer, stacked along dpost's leading `layers` axis
    num_layers: int | None = None  # depth of this stack when it differs from the call's (e.g. T5 decoder)


def import_params(
    rules: list[TensorRule],
    getter: Callable[[str], np.ndarray],
    abstract: Mapping,
    shardings: Mapping | None,
    num_layers: int,
    source: str,
) -> dict:
    """Builds the param tree from external tensors.

    abstract: pytree of ShapeDtypeStruct (unboxed) giving each parameter's expected shape.
    shardings: matching pytree of jax.sharding.Sharding, or None for the default device.
    Raises ValueError naming the source and tensor on a missing tensor or a shape mismatch.
    """
    flat_abstract = traverse_util.flatten_dict(dict(abstract))
    flat_shardings = traverse_util.flatten_dict(dict(shardings)) if shardings is not None else {}
    covered = {rule.path for rule in rules}
    if covered != set(flat_abstract):
        raise ValueError(f"{source}: rule table does not cover params {sorted(set(flat_abstract) ^ covered)}")
    out = {}
    for rule in rules:
        expected = tuple(flat_abstract[rule.path].shape)
        depth = rule.num_layers if rule.num_layers is not None else num_layers
        names = [rule.name.format(layer=i) for i in range(depth)] if rule.stacked else [rule.name]
        piece_shape = expected[1:] if rule.stacked else expected
        pieces = []
        for name in names:
            try:
                tensor = np.asarray(getter(name), dtype=np.float32)
            except KeyError:
                raise ValueError(f"{source}: missing tensor {name!r} (for param {'/'.join(rule.path)})") from None
            try:
                piece = rule.to_dpost(tensor)
            except ValueError:  # a reshape of a wrongly sized tensor
                piece = None
            if piece is None or piece.shape != piece_shape:
                raise ValueError(
                    f"{source}: tensor {name!r} has shape {tensor.shape}, which does not match the config "
                    f"(param {'/'.join(rule.path)} expects {piece_shape} per tensor)"
                )
            pieces.append(piece)
        value = np.stack(pieces) if rule.stacked else pieces[0]
        sharding = flat_shardings.get(rule.path)
        out[rule.path] = jax.device_put(value, sharding) if sharding is not None else jax.device_put(value)
    return traverse_util.unflatten_dict(out)


def export_tensors(rules: list[TensorRule], params: Mapping, num_layers: int) -> dict[str, np.ndarray]:
    """dpost params -> {external name: fp32 numpy tensor}. Gathers one parameter at a time."""
    flat = traverse_util.flatten_dict(dict(params))
    tensors = {}
    for rule in rules:
        value = np.asarray(jax.device_get(flat[rule.path]), dtype=np.float32)
        if rule.stacked:
            for i in range(rule.num_layers if rule.num_layers is not None else num_layers):
                tensors[rule.name.format(layer=i)] = np.ascontiguousarray(rule.to_external(value[i]))
        else:
            tensors[rule.name] = np.ascontiguousarray(rule.to_external(value))
    return tensors

