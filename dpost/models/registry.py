"""Model families: one entry per family names its module, config and weight-conversion functions."""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    package: str  # dpost.models.<family>: model.py (module, config), params.py (conversion), known.py (hub shapes)
    hf_architectures: tuple[str, ...]

    @property
    def model(self) -> Any:
        return importlib.import_module(f"{self.package}.model")

    @property
    def params(self) -> Any:
        return importlib.import_module(f"{self.package}.params")

    # Each family's model.py defines: <Config> dataclass, make_module(config), init_params(config, rng).
    # Each family's params.py defines: config_from_hf(dict), config_to_hf(config), hf_rules(config),
    # and optionally settle_config(config, tensor getter, source).
    def make_module(self, config) -> Any:
        return self.model.make_module(config)

    def init_params(self, config, rng) -> Any:
        return self.model.init_params(config, rng)

    def config_from_hf(self, hf: dict) -> Any:
        return self.params.config_from_hf(hf)

    def settle_config(self, config, getter: Callable[[str], Any], source: str) -> Any:
        """The config as the checkpoint's tensors settle it (optional params.settle_config; T5: head tying)."""
        settle = getattr(self.params, "settle_config", None)
        return settle(config, getter, source) if settle is not None else config

    def config_to_hf(self, config) -> dict:
        return self.params.config_to_hf(config)

    def hf_rules(self, config) -> list:
        return self.params.hf_rules(config)

    def config_class(self) -> Callable[..., Any]:
        return self.model.CONFIG_CLASS

    @property
    def known(self) -> Any:
        """known.py: HF_CONFIGS (hub id -> config.json) and GGUF_FILES (file stem -> hub id)."""
        return importlib.import_module(f"{self.package}.known")


FAMILIES = {
    "llama": Family("llama", "dpost.models.llama", ("LlamaForCausalLM",)),
    "t5": Family("t5", "dpost.models.t5", ("T5ForConditionalGeneration",)),
}


def family_for_hf_config(hf: dict, source: str) -> Family:
    archs = tuple(hf.get("architectures") or ())
    model_type = hf.get("model_type")
    for family in FAMILIES.values():
        if set(archs) & set(family.hf_architectures) or (not archs and model_type == family.name):
            return family
    raise ValueError(
        f"{source}: unsupported architecture {archs or model_type!r}; dpost supports "
        + ", ".join(a for f in FAMILIES.values() for a in f.hf_architectures)
    )


def get_family(name: str) -> Family:
    if name not in FAMILIES:
        raise ValueError(f"unknown model family {name!r}; expected one of {sorted(FAMILIES)}")
    return FAMILIES[name]
