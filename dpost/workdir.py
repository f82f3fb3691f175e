"""The run directory: one folder per stage, atomic outputs, manifests, and the config guard.

    WORKDIR/config.json            the run's config (a changed config under it is refused)
    WORKDIR/iter_<k>/<stage>/      a stage's outputs; MANIFEST written last, atomically

A stage is finished exactly when its manifest exists and names the run's config hash.
`StageDir.cached` is the one place that decides it: a finished stage's result is read back from
its folder, any other stage runs (and resumes from what it left there: training from its last
checkpoint, sampling from its last completed shard). Paths may be local or gs:// (etils.epath).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Any, Callable, Iterable, TypeVar

import jax
from etils import epath

from dpost import distributed

MANIFEST = "manifest.json"
CACHE_ENV = "DPOST_CACHE_DIR"
CONFIG_FILE = "config.json"
# Fields that may change between reruns without invalidating finished stages.
# Fields no stage's result depends on: left out of the hashes and the config guard. eval.final_replicates
# only adds stages (replicates of the last SFT stage), so a finished run can be measured again with more.
RUNTIME_FIELDS = ("progress", "mode", "eval.checkpoint", "log_every", "pretrain.cache_dir", "compilation_cache",
                  "eval.final_replicates")
# Fields the warm-up (iteration 0: SFT_0 and its evaluation) does not depend on: runs of different
# methods with one seed share SFT_0 (`dpost.compare` copies it instead of training it again).
LOOP_FIELDS = ("method", "iterations", "dpo.", "pairs.", "pseudo_labels.", "sampling.pairs.", "sampling.labels.")
# Fields added after runs were recorded, with the default that behaves as before the field existed:
# at that default a field is left out of the hash and the config guard, so earlier runs keep their
# stage hashes and resume.
ADDED_FIELDS = {"model.scan_layers": True, "data.synthetic.n_test_extra": 0, "pairs.select": "least_similar",
                "pairs.rejected": "sample", "dpo.count": "all",
                **{f"{stage}.optimizer.moments_dtype": "float32" for stage in ("sft", "dpo", "pretrain")},
                **{f"{stage}.optimizer.average_last": 0.0 for stage in ("sft", "dpo", "pretrain")}}


def flatten_config(config) -> dict[str, Any]:
    """ConfigDict -> {"a.b": value} with JSON-friendly values."""
    out: dict[str, Any] = {}

    def walk(node, prefix):
        items = node.items() if hasattr(node, "items") else None
        if items is None:
            out[prefix] = list(node) if isinstance(node, tuple) else node
            return
        if not items and prefix:
            out[prefix] = {}
        for key, value in items:
            walk(value, f"{prefix}.{key}" if prefix else key)

    walk(config, "")
    return out


def keyed_fields(flat: dict[str, Any]) -> dict[str, Any]:
    """The fields a run's identity depends on: all but ADDED_FIELDS at their defaults."""
    return {k: v for k, v in flat.items() if k not in ADDED_FIELDS or _norm(v) != ADDED_FIELDS[k]}


def config_hash(flat: dict[str, Any], ignore: tuple[str, ...] = ()) -> str:
    kept = {k: v for k, v in keyed_fields(flat).items() if not k.startswith(RUNTIME_FIELDS + ignore)}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:16]


def write_text_atomic(path: epath.Path, text: str) -> None:
    """Write to a temporary name beside the target, then rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp{jax.process_index()}"
    tmp.write_text(text)
    tmp.replace(path)  # replace, not rename: rerunning a finished run rewrites results.json


def write_json_atomic(path: epath.Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=1, default=_json_default) + "\n")


def write_jsonl_atomic(path: epath.Path, rows: Iterable[dict]) -> None:
    write_text_atomic(path, "".join(json.dumps(r, default=_json_default) + "\n" for r in rows))


def read_jsonl(path: epath.Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _json_default(obj):
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj)}")


def absolute(path: str) -> epath.Path:
    """Orbax wants absolute paths; URLs (gs://...) are left as they are."""
    return epath.Path(path if "://" in str(path) else os.path.abspath(path))


def cache_root(where: str = "") -> epath.Path:
    """Where dpost caches across runs (pre-trained M0s, compiled programs): `where` if given, else
    $DPOST_CACHE_DIR, else ~/.cache/dpost."""
    return absolute(where or os.environ.get(CACHE_ENV) or os.path.expanduser("~/.cache/dpost"))


class RunDir:
    def __init__(self, root: str, config, config_path: str = ""):
        self.root = absolute(root)
        self.flat = flatten_config(config)
        self.hash = config_hash(self.flat)
        self.warmup_hash = config_hash(self.flat, LOOP_FIELDS)
        self.config_path = config_path

    def guard_config(self) -> None:
        """Refuses to continue a run whose stored config differs (names the changed fields)."""
        path = self.root / CONFIG_FILE
        if path.exists():
            stored = keyed_fields(json.loads(path.read_text())["config"])
            flat = keyed_fields(self.flat)
            changed = sorted(
                k for k in set(stored) | set(flat)
                if not k.startswith(RUNTIME_FIELDS) and _norm(stored.get(k, "<absent>")) != _norm(flat.get(k, "<absent>"))
            )
            if changed:
                details = ", ".join(f"{k}: {stored.get(k, '<absent>')!r} -> {self.flat.get(k, '<absent>')!r}" for k in changed[:8])
                raise ValueError(
                    f"workdir {self.root} holds a run with a different config; changed fields: {details}. "
                    "Use a new --workdir (or delete the old one) to run with this config."
                )
            return
        if jax.process_index() == 0:
            write_json_atomic(path, {"config_path": self.config_path, "hash": self.hash, "config": self.flat})

    def stage(self, iteration: int, name: str) -> "StageDir":
        return StageDir(self.root / f"iter_{iteration}" / name, self.warmup_hash if iteration == 0 else self.hash)


def _norm(v):
    return json.loads(json.dumps(v, default=str))


Result = TypeVar("Result")


class StageDir:
    def __init__(self, path: epath.Path, run_hash: str):
        self.path = path
        self.run_hash = run_hash

    @property
    def manifest_path(self) -> epath.Path:
        return self.path / MANIFEST

    def done(self) -> bool:
        if not self.manifest_path.exists():
            return False
        return json.loads(self.manifest_path.read_text()).get("config_hash") == self.run_hash

    def manifest(self) -> dict:
        return json.loads(self.manifest_path.read_text())

    def cached(self, run: Callable[[], tuple[Result, dict]],
               load: Callable[["StageDir"], Result]) -> tuple[Result, dict]:
        """The stage's (result, manifest), computed once per run directory.

        A finished stage's result is `load(self)`, read from its folder. Otherwise `run()` computes
        it, writing its outputs under `self.path` (and resuming from what an interrupted run left
        there), and returns (result, manifest fields); the manifest, those fields with the config
        hash and the seconds, is then written last and atomically by process 0. Every process
        returns the manifest read back from that file, so all hosts report the same one.
        """
        if self.done():
            return load(self), self.manifest()
        self.path.mkdir(parents=True, exist_ok=True)
        started = time.time()
        result, fields = run()
        manifest = dict(stage=self.path.name, config_hash=self.run_hash, seconds=round(time.time() - started, 3),
                        **fields)
        if jax.process_index() == 0:
            write_json_atomic(self.manifest_path, manifest)
        distributed.barrier(f"finished {self.path}")
        return result, self.manifest()

