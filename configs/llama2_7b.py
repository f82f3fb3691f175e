"""Llama-2-7B, the paper's Llama column (Table 4/5) on the release's hyper-parameters:

    python -m dpost.main --config configs/llama2_7b.py --workdir runs/llama2_7b

SFT lr 2e-5 x 2 epochs, global batch 128, warm-up ratio 0.03 (the paper's Table 5; the release's
config says 0.1), dropout 0.1 (transformers' Llama `attention_dropout`; SFT only, since the
release's DPO ran through TRL, which turns dropout off); DPO lr 3e-7 x 100 steps, batch 128;
10 sampled pseudo-labels per question (the paper's Llama results); bf16, remat.

Data: the release's own GSM8K split (`data.source="local"`): `train.jsonl`, `dev.jsonl` and
`test.jsonl` from the `gsm8k/` folder of the DPO-ST release (github.com/tianduowang/dpo-st), read
from `data.dir` or `$DPOST_DATA_DIR` (either the folder holding `gsm8k/` or `gsm8k/` itself).
`--config.data.source=hub` instead splits `openai/gsm8k`'s training set with a seeded permutation:
about 10% of train and most of dev differ from the release's split.
"""

from dpost import defaults


def get_config():
    c = defaults.base_config()
    c.model.source = "hf:meta-llama/Llama-2-7b-hf"
    c.model.family = "llama"
    c.model.dtype = "bfloat16"
    c.model.remat = True
    c.model.dropout = 0.1
    # cuDNN flash attention on GPU for DPO, scoring and prefill (SFT with dropout keeps the einsum
    # path); on one H200 a DPO step ran 1.2x (T5-Large) to 1.6x (Llama-1B) faster (BENCHMARKS.md)
    c.model.attention = "fused"
    c.data.source = "local"
    c.data.max_prompt_len = 256  # Llama: prompt 256 / target 384 tokens
    c.data.max_target_len = 384
    c.sft.epochs = 2
    c.sft.batch_size = 128
    c.sft.optimizer.learning_rate = 2e-5
    c.sft.optimizer.warmup_ratio = 0.03
    c.dpo.steps = 100
    c.dpo.batch_size = 128
    c.dpo.optimizer.learning_rate = 3e-7
    c.sampling.labels.num_samples = 10
    c.sampling.eval.batch_size = 16
    # v4-32 / v5e-16 / 8 GPUs: FSDP across all devices, 2-way tensor parallel within a host's chips.
    c.mesh = dict(data=1, fsdp=-1, tensor=2)
    return c
