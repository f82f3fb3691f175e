"""Weight sources: `hf:<dir or hub id>`, `gguf:<file>`, `orbax:<dir>`, and export back to HF.

Each loader produces (family, config, tensor getter, tokenizer); `load` then builds abstract params,
their shardings from the logical-axis rules, and places tensors one at a time into those shards.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from typing import Any, Callable

import flax.linen as nn
import jax
import numpy as np

from dpost import sharding as sharding_lib
from dpost.models import convert
from dpost.models.bundle import ModelBundle
from dpost.models.registry import FAMILIES, Family, family_for_hf_config, get_family
from dpost.trees import check_tree_matches

MODEL_INFO_FILE = "dpost_model.json"  # beside orbax params: family + config
PARAMS_DIR = "params"
TOKENIZER_DIR = "tokenizer"
SCHEMES = ("hf", "gguf", "orbax")


def split_source(source: str) -> tuple[str, str]:
    scheme, sep, location = source.partition(":")
    if not sep or scheme not in SCHEMES or not location:
        raise ValueError(f"model source {source!r}: expected one of " + ", ".join(f"{s}:<...>" for s in SCHEMES))
    return scheme, location


def abstract_params(family: Family, config) -> Any:
    """Boxed ShapeDtypeStructs (with logical axis names) without allocating anything."""
    return jax.eval_shape(lambda: family.init_params(config, jax.random.key(0)))


def _with_dtype(config, dtype: str):
    return dataclasses.replace(config, dtype=str(np.dtype(dtype)) if dtype != "bfloat16" else "bfloat16")


# -- hf: -------------------------------------------------------------------------------------------

def _resolve_hf_dir(location: str, source: str) -> str:
    if os.path.isdir(location):
        return location
    if os.path.exists(location) or location.startswith((".", "/")):
        raise ValueError(f"{source}: no such directory")
    try:  # a hub id: download (users with network access)
        from huggingface_hub import snapshot_download

        return snapshot_download(location, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"])
    except Exception as err:  # noqa: BLE001 - report any hub failure with the source named
        raise ValueError(f"{source}: not a local directory and the hub download failed: {err}") from err


def _hf_tensor_getter(folder: str, source: str) -> Callable[[str], np.ndarray]:
    from safetensors import safe_open

    files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
    if files:
        index = {}
        handles = [safe_open(os.path.join(folder, f), framework="numpy") for f in files]
        for handle in handles:
            for key in handle.keys():
                index[key] = handle

        def get(name):
            return index[name].get_tensor(name)

        return get
    if any(f.endswith(".bin") for f in os.listdir(folder)):
        # PyTorch .bin files are pickles: dpost never unpickles files (nor imports torch at run time).
        raise ValueError(f"{source}: only PyTorch .bin weights found; dpost reads safetensors: convert them with "
                         "transformers (`from_pretrained(folder).save_pretrained(out, safe_serialization=True)`)")
    raise ValueError(f"{source}: no *.safetensors weights in {folder}")


def _load_tokenizer(folder: str, source: str, **kwargs):
    import transformers

    try:
        return transformers.AutoTokenizer.from_pretrained(folder, **kwargs)
    except Exception as err:  # noqa: BLE001
        raise ValueError(f"{source}: could not load the tokenizer: {err}") from err


def read_hf_config(folder: str, source: str) -> dict:
    """The folder's config.json."""
    config_path = os.path.join(folder, "config.json")
    if not os.path.exists(config_path):
        raise ValueError(f"{source}: missing file {config_path}")
    with open(config_path) as f:
        return json.load(f)


def _from_hf(location: str, source: str):
    folder = _resolve_hf_dir(location, source)
    hf_config = read_hf_config(folder, source)
    family = family_for_hf_config(hf_config, source)
    getter = _hf_tensor_getter(folder, source)
    config = family.settle_config(family.config_from_hf(hf_config), getter, source)
    tokenizer = _load_tokenizer(folder, source) if _has_tokenizer(folder) else None
    return family, config, getter, tokenizer


def _has_tokenizer(folder: str) -> bool:
    return any(
        os.path.exists(os.path.join(folder, f)) for f in ("tokenizer.json", "tokenizer_config.json", "spiece.model")
    )


# -- gguf: -----------------------------------------------------------------------------------------

def _gguf_metadata(reader) -> dict:
    meta = {}
    for key, field in reader.fields.items():
        if key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type", "tokenizer.ggml.scores"):
            continue
        try:
            meta[key] = field.contents()
        except Exception:  # noqa: BLE001 - unreadable metadata is not needed for loading
            continue
    return meta


def read_gguf(location: str, source: str):
    """(reader, metadata, LlamaConfig) of a GGUF file: its header only, no tensor is read."""
    import gguf

    from dpost.models.llama import params as llama_params

    if not os.path.isfile(location):
        raise ValueError(f"{source}: no such file")
    try:
        reader = gguf.GGUFReader(location)
    except Exception as err:  # noqa: BLE001
        raise ValueError(f"{source}: not a readable GGUF file: {err}") from err
    meta = _gguf_metadata(reader)
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"{source}: unsupported GGUF architecture {arch!r}; dpost reads llama GGUF files")
    meta["_has_output_weight"] = any(t.name == "output.weight" for t in reader.tensors)
    if "llama.vocab_size" not in meta:
        meta["llama.vocab_size"] = len(reader.fields["tokenizer.ggml.tokens"].data)
    return reader, meta, llama_params.config_from_gguf(meta)


def _from_gguf(location: str, source: str):
    from gguf.quants import dequantize

    from dpost.models.llama import params as llama_params

    reader, _, config = read_gguf(location, source)
    family = get_family("llama")
    tensors = {t.name: t for t in reader.tensors}
    by_hf_name = {}
    for name in tensors:
        hf_name = llama_params.gguf_name_to_hf(name)
        if hf_name is not None:
            by_hf_name[hf_name] = name

    def get(hf_name):
        tensor = tensors[by_hf_name[hf_name]]
        shape = tuple(int(d) for d in reversed(tensor.shape))  # GGUF lists dims innermost first
        w = dequantize(tensor.data, tensor.tensor_type).reshape(shape).astype(np.float32)
        if hf_name.endswith("q_proj.weight"):
            w = llama_params.unpermute_rope_rows(w, config.num_heads)
        elif hf_name.endswith("k_proj.weight"):
            w = llama_params.unpermute_rope_rows(w, config.num_kv_heads)
        return w

    folder, name = os.path.split(os.path.abspath(location))
    tokenizer = _load_tokenizer(folder, source, gguf_file=name)
    return family, config, get, tokenizer


# -- orbax: ----------------------------------------------------------------------------------------

def read_model_info(root, source: str):
    """(family, config) from a dpost checkpoint folder's dpost_model.json."""
    info_path = root / MODEL_INFO_FILE
    if not info_path.exists():
        raise ValueError(f"{source}: missing file {info_path} (not a dpost model checkpoint)")
    info = json.loads(info_path.read_text())
    family = get_family(info["family"])
    return family, family.config_class()(**info["config"])


def orbax_root(location: str):
    from etils import epath

    return epath.Path(location if "://" in location else os.path.abspath(location))


def _from_orbax(location: str, source: str):
    root = orbax_root(location)
    family, config = read_model_info(root, source)
    tokenizer = None
    if (root / TOKENIZER_DIR).exists():
        tokenizer = _load_tokenizer(_local_copy(root / TOKENIZER_DIR), source)
    return family, config, root / PARAMS_DIR, tokenizer


def _local_copy(path) -> str:
    """Tokenizers load from local folders only; copy a remote (gs://) folder down first."""
    if not str(path).startswith("gs://"):
        return str(path)
    local = tempfile.mkdtemp(prefix="dpost_tok_")
    for item in path.iterdir():
        (local_path := os.path.join(local, item.name))
        with open(local_path, "wb") as f:
            f.write(item.read_bytes())
    return local


def restore_orbax_params(params_path, boxed_abstract, layout: sharding_lib.Layout, source: str):
    """Restores params into their shardings; a mismatch names the key and both shapes."""
    import orbax.checkpoint as ocp

    abstract = nn.unbox(boxed_abstract)
    shardings = layout.params(boxed_abstract)
    if shardings is None:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda _: device, abstract)
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    with ocp.StandardCheckpointer() as ckptr:
        stored = ckptr.metadata(params_path)
        stored_tree = getattr(stored, "item_metadata", stored)
        stored_tree = getattr(stored_tree, "tree", stored_tree)
        check_tree_matches(stored_tree, abstract, f"{source}: checkpoint")
        return ckptr.restore(params_path, target)


def save_orbax(bundle: ModelBundle, directory: str) -> None:
    """Writes params (Orbax), family+config JSON and the tokenizer; readable by `load('orbax:...')`."""
    import orbax.checkpoint as ocp
    from etils import epath

    root = epath.Path(directory if "://" in str(directory) else os.path.abspath(directory))
    root.mkdir(parents=True, exist_ok=True)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(root / PARAMS_DIR, bundle.params, force=True)
    if jax.process_index() == 0:
        info = {"family": bundle.family, "config": dataclasses.asdict(bundle.config)}
        tmp = root / (MODEL_INFO_FILE + ".tmp")
        tmp.write_text(json.dumps(info, indent=1))
        tmp.replace(root / MODEL_INFO_FILE)  # overwrites an earlier save of the same model
        if bundle.tokenizer is not None:
            _save_tokenizer(bundle.tokenizer, root / TOKENIZER_DIR)


def _save_tokenizer(tokenizer, path) -> None:
    if str(path).startswith("gs://"):
        local = tempfile.mkdtemp(prefix="dpost_tok_")
        tokenizer.save_pretrained(local)
        path.mkdir(parents=True, exist_ok=True)
        for name in os.listdir(local):
            (path / name).write_bytes(open(os.path.join(local, name), "rb").read())
    else:
        tokenizer.save_pretrained(str(path))


# -- public ---------------------------------------------------------------------------------------

def load(source: str, dtype: str = "float32", mesh=None, *, layout: sharding_lib.Layout | None = None,
         tokenizer: Any = None) -> ModelBundle:
    """Loads a model from `hf:`, `gguf:` or `orbax:`; params go straight into their shardings by
    `layout` (mesh + rules; `mesh=` alone: that mesh with the default rules; neither: one device)."""
    layout = sharding_lib.as_layout(layout, mesh)
    scheme, location = split_source(source)
    loader = {"hf": _from_hf, "gguf": _from_gguf, "orbax": _from_orbax}[scheme]
    family, config, getter, loaded_tokenizer = loader(location, source)
    config = _with_dtype(config, dtype)
    boxed = abstract_params(family, config)
    if scheme == "orbax":
        params = restore_orbax_params(getter, boxed, layout, source)
    else:
        params = convert.import_params(
            family.hf_rules(config), getter, nn.unbox(boxed), layout.params(boxed),
            _num_layers(config), source,
        )
    return ModelBundle(
        family=family.name,
        module=family.make_module(config),
        params=params,
        tokenizer=tokenizer if tokenizer is not None else loaded_tokenizer,
        config=config,
        layout=layout,
        source=source,
    )


def _num_layers(config) -> int:
    return int(config.num_layers)


def init_random(family_name: str, config, tokenizer=None, seed: int = 0, mesh=None, *,
                layout: sharding_lib.Layout | None = None) -> ModelBundle:
    """A randomly initialised model (tests, from-scratch tiny models), created in its shardings."""
    layout = sharding_lib.as_layout(layout, mesh)
    family = get_family(family_name)
    boxed = abstract_params(family, config)
    shardings = layout.params(boxed)
    init = lambda rng: nn.unbox(family.init_params(config, rng))  # noqa: E731
    params = jax.jit(init, out_shardings=shardings)(jax.random.key(seed))
    return ModelBundle(family_name, family.make_module(config), params, tokenizer, config, layout, f"random:{seed}")


def export_hf(bundle: ModelBundle, out_dir: str) -> None:
    """Writes config.json + model.safetensors (+ tokenizer) that transformers loads with equal logits."""
    from safetensors.numpy import save_file

    family = get_family(bundle.family)
    tensors = convert.export_tensors(family.hf_rules(bundle.config), bundle.params, _num_layers(bundle.config))
    parent = os.path.dirname(os.path.abspath(out_dir)) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".export_", dir=parent)
    try:
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(family.config_to_hf(bundle.config), f, indent=1)
        save_file(tensors, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        if bundle.tokenizer is not None:
            bundle.tokenizer.save_pretrained(tmp)
        if os.path.exists(out_dir):
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


__all__ = ["load", "export_hf", "save_orbax", "init_random", "split_source", "FAMILIES"]
