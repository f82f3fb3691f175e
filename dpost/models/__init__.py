"""Model families (llama, t5), weight import/export and sequence scoring.

    bundle = models.load("hf:<dir or hub id>" | "gguf:<file.gguf>" | "orbax:<dir>", dtype="float32", mesh=None)
    models.sequence_logprobs(bundle, prompt_ids, completion_ids)  # [B] summed completion log-probs
    models.export_hf(bundle, out_dir)
"""

from dpost.models.bundle import ModelBundle
from dpost.models.registry import FAMILIES, get_family
from dpost.models.scoring import completion_token_logprobs, sequence_logprobs
from dpost.models.sources import export_hf, init_random, load, save_orbax

__all__ = [
    "ModelBundle", "FAMILIES", "get_family", "load", "export_hf", "save_orbax", "init_random",
    "sequence_logprobs", "completion_token_logprobs",
]
