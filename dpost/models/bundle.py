"""ModelBundle: everything needed to run one model (module, params, tokenizer, config)."""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn

from dpost.sharding import Layout


@dataclasses.dataclass
class ModelBundle:
    family: str  # "llama" | "t5"
    module: nn.Module  # exposes completion_logits / prefill / decode_step (see models/llama/model.py)
    params: Any  # unboxed pytree of jax.Array (fp32 masters), possibly sharded
    tokenizer: Any  # a transformers tokenizer
    config: Any  # LlamaConfig | T5Config
    layout: Layout = Layout()  # the mesh and rules the params are laid out by (default: one device)
    source: str = ""  # where it was loaded from (for messages and manifests)

    @property
    def mesh(self) -> Any:
        return self.layout.mesh

    def replace(self, **changes) -> "ModelBundle":
        return dataclasses.replace(self, **changes)

    @property
    def eos_token_id(self) -> int:
        return int(self.tokenizer.eos_token_id if self.tokenizer is not None else self.config.eos_token_id)

    @property
    def pad_token_id(self) -> int:
        tok = self.tokenizer
        if tok is not None and tok.pad_token_id is not None:
            return int(tok.pad_token_id)
        return int(self.config.pad_token_id if self.config.pad_token_id is not None else self.eos_token_id)
