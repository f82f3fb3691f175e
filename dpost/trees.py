"""Comparing a stored checkpoint's tree with the tree a model (or train state) expects, before
restoring into it: a mismatch names the keys and shapes instead of failing deep inside Orbax."""

from __future__ import annotations

from typing import Any

import jax


class CheckpointMismatchError(ValueError):
    """A checkpoint whose tree does not match the model/optimizer it is restored into."""


def flatten_paths(tree: Any) -> dict[str, Any]:
    """'/'-joined key path -> leaf, for any pytree (orbax metadata trees included)."""
    flat = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(
        tree, is_leaf=lambda x: hasattr(x, "shape") or x is None
    )[0]:
        parts = []
        for p in path:
            for attr in ("key", "name", "idx"):
                if hasattr(p, attr):
                    parts.append(str(getattr(p, attr)))
                    break
            else:
                parts.append(str(p))
        flat["/".join(parts)] = leaf
    return flat


def check_tree_matches(stored: Any, expected: Any, what: str) -> None:
    """Raises CheckpointMismatchError naming every missing/unexpected key and the first shape
    mismatches; ``what`` names the checkpoint in the message."""
    flat_stored = {k: v for k, v in flatten_paths(stored).items() if v is not None}
    flat_expected = {k: v for k, v in flatten_paths(expected).items() if v is not None}
    missing = sorted(set(flat_expected) - set(flat_stored))
    extra = sorted(set(flat_stored) - set(flat_expected))
    problems = []
    if missing:
        problems.append(f"missing keys {missing[:8]}" + (" ..." if len(missing) > 8 else ""))
    if extra:
        problems.append(f"unexpected keys {extra[:8]}" + (" ..." if len(extra) > 8 else ""))
    for key in sorted(set(flat_expected) & set(flat_stored)):
        have = tuple(getattr(flat_stored[key], "shape", ()) or ())
        want = tuple(getattr(flat_expected[key], "shape", ()) or ())
        if have != want:
            problems.append(f"key '{key}' has shape {have} in the checkpoint but the model expects {want}")
    if problems:
        raise CheckpointMismatchError(f"{what} does not match the model: " + "; ".join(problems[:8]))
