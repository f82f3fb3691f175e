"""Flan-T5-Base or Flan-T5-Large with the DPO-ST release's recipe (Large is its main setting):

    python -m dpost.main --config configs/flan_t5.py:large --workdir runs/flan_t5_large
    python -m dpost.main --config configs/flan_t5.py:base --workdir runs/flan_t5_base

(`configs/flan_t5_large.py` and `configs/flan_t5_base.py` are the same two configs.)

Recipe (../shared/docs/dpo-st-protocol.md; the paper uses it for Base too): SFT AdamW lr 3e-4 x 8
epochs, global batch 96, dropout 0.1 (transformers' T5 `dropout_rate`; SFT only, since the
release's DPO ran through TRL, which turns dropout off); DPO lr 7e-7 x 150 steps, batch 96; bf16.

Data: the release's own GSM8K split (`data.source="local"`): `train.jsonl`, `dev.jsonl` and
`test.jsonl` from the `gsm8k/` folder of the DPO-ST release (github.com/tianduowang/dpo-st), read
from `data.dir` or `$DPOST_DATA_DIR` (either the folder holding `gsm8k/` or `gsm8k/` itself).
`--config.data.source=hub` instead splits `openai/gsm8k`'s training set with a seeded permutation:
about 10% of train and most of dev differ from the release's split.
"""

from dpost import defaults

VARIANTS = {"base": "hf:google/flan-t5-base", "large": "hf:google/flan-t5-large"}


def get_config(variant: str = "large"):
    if variant not in VARIANTS:
        raise ValueError(f"configs/flan_t5.py: unknown variant {variant!r}; expected one of {sorted(VARIANTS)}")
    c = defaults.base_config()
    c.model.source = VARIANTS[variant]
    c.model.family = "t5"
    c.model.dtype = "bfloat16"
    c.model.dropout = 0.1
    # cuDNN flash attention on GPU for DPO, scoring and prefill (SFT with dropout keeps the einsum
    # path); on one H200 a DPO step ran 1.2x (T5-Large) to 1.6x (Llama-1B) faster (BENCHMARKS.md)
    c.model.attention = "fused"
    c.data.source = "local"
    c.data.max_prompt_len = 200  # T5: source 200 / target 300 tokens
    c.data.max_target_len = 300
    c.sft.epochs = 8
    c.sft.batch_size = 96
    c.sft.optimizer.learning_rate = 3e-4
    c.dpo.steps = 150
    c.dpo.batch_size = 96
    c.dpo.optimizer.learning_rate = 7e-7
    c.sampling.eval.batch_size = 96
    # TPU v4-8 (4 chips) / 8 GPUs: pure data parallel with FSDP over the parameters.
    c.mesh = dict(data=1, fsdp=-1, tensor=1)
    return c
