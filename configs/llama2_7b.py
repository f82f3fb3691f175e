"""Llama-2-7B with the release's hyper-parameters (SFT lr 2e-5 x 2 epochs, batch 128; DPO lr 3e-7 x 100)."""

from dpost import defaults


def get_config():
    c = defaults.base_config()
    c.model.source = "hf:meta-llama/Llama-2-7b-hf"
    c.model.family = "llama"
    c.model.dtype = "bfloat16"
    c.model.remat = True
    c.data.source = "hub"
    c.data.max_prompt_len = 256  # Llama: prompt 256 / target 384 tokens
    c.data.max_target_len = 384
    c.sft.epochs = 2
    c.sft.batch_size = 128
    c.sft.optimizer.learning_rate = 2e-5
    c.dpo.steps = 100
    c.dpo.batch_size = 128
    c.dpo.optimizer.learning_rate = 3e-7
    c.sampling.eval.batch_size = 16
    # v4-32 / v5e-16 / 8 GPUs: FSDP across all devices, 2-way tensor parallel within a host's chips.
    c.mesh = dict(data=1, fsdp=-1, tensor=2)
    return c
