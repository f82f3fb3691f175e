"""A model's family and config (its shapes) without loading a weight or touching the network.

`scratch`/`pretrain` sources from `config.model.scratch`, `hf:<local dir>` from its config.json,
`gguf:<file>` from the GGUF header, `orbax:<dir>` from dpost_model.json, and hub ids from the
families' `known.py` tables or the local Hugging Face cache. Used by the memory plan, which runs
before anything is loaded; a source whose shapes cannot be read this way raises `UnknownShapes`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

from dpost.models import sources
from dpost.models.registry import FAMILIES, family_for_hf_config, get_family


class UnknownShapes(ValueError):
    """The source's shapes cannot be read without loading it (e.g. a hub id neither known nor cached)."""


@dataclasses.dataclass(frozen=True)
class ModelShapes:
    family: str  # "llama" | "t5"
    config: Any  # the family's config dataclass (LlamaConfig | T5Config)
    source: str  # config.model.source
    origin: str  # where the shapes were read from


def known_hf_config(hub_id: str) -> tuple[dict, str] | None:
    """(config.json, the table it is in) of a hub id some family's known.py lists (case-insensitive)."""
    wanted = hub_id.strip("/").lower()
    for family in FAMILIES.values():
        for name, hf in family.known.HF_CONFIGS.items():
            if name.lower() == wanted:
                return hf, f"{family.package}.known.HF_CONFIGS"
    return None


def _hf_cached_config(hub_id: str) -> dict | None:
    """config.json from the local Hugging Face cache (never the network)."""
    try:
        from huggingface_hub import hf_hub_download

        path = hf_hub_download(hub_id, "config.json", local_files_only=True)
    except Exception:  # noqa: BLE001 - not cached / not a valid repo id
        return None
    with open(path) as f:
        return json.load(f)


def _hf_config(location: str, source: str) -> tuple[dict, str]:
    if os.path.isdir(location):
        return sources.read_hf_config(location, source), os.path.join(location, "config.json")
    known = known_hf_config(location)
    if known is not None:
        return known
    cached = _hf_cached_config(location)
    if cached is not None:
        return cached, "Hugging Face cache"
    raise UnknownShapes(f"{source}: not a local directory, not in the Hugging Face cache and not in a family's "
                        "known.py table")


def _gguf_config(location: str, source: str) -> tuple[str, Any, str]:
    if os.path.isfile(location):
        return "llama", sources.read_gguf(location, source)[2], "GGUF metadata"
    stem = os.path.splitext(os.path.basename(location.split(" ")[0]))[0]
    for family in FAMILIES.values():
        for prefix, hub_id in family.known.GGUF_FILES.items():
            if stem.startswith(prefix):
                hf, table = known_hf_config(hub_id)
                return family.name, family.config_from_hf(hf), f"{table}[{hub_id!r}] (file not found)"
    raise UnknownShapes(f"{source}: no such GGUF file and no known shapes for {stem!r}")


def _scratch_config(family_name: str, scratch: Mapping[str, Any]):
    cls = get_family(family_name).config_class()
    fields = {f.name for f in dataclasses.fields(cls)}
    values = dict(scratch)
    if "vocab_size" not in values and "tokenizer_vocab_size" in values:
        values["vocab_size"] = values["tokenizer_vocab_size"]
    return cls(**{k: v for k, v in values.items() if k in fields})


def model_shapes(config) -> ModelShapes:
    """Family and family config of `config.model` (dtype, remat and scan_layers from it), without
    loading weights."""
    m = config.model
    source = str(m.source)
    if source in ("scratch", "pretrain"):
        if not m.family:
            raise ValueError(f"model.source={source} needs model.family (llama | t5)")
        family, cfg, origin = m.family, _scratch_config(m.family, m.scratch), "config.model.scratch"
    else:
        scheme, location = sources.split_source(source)
        if scheme == "hf":
            hf, origin = _hf_config(location, source)
            fam = family_for_hf_config(hf, source)
            family, cfg = fam.name, fam.config_from_hf(hf)
        elif scheme == "gguf":
            family, cfg, origin = _gguf_config(location, source)
        else:
            fam, cfg = sources.read_model_info(sources.orbax_root(location), source)
            family, origin = fam.name, sources.MODEL_INFO_FILE
    cfg = dataclasses.replace(cfg, dtype=str(m.dtype) if m.dtype else "float32", remat=m.remat,
                              scan_layers=bool(m.scan_layers))
    return ModelShapes(family, cfg, source, origin)
