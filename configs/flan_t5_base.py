"""Flan-T5-Base (the paper also reports it; same recipe as Flan-T5-Large)."""

from dpost import defaults


def get_config():
    c = defaults.base_config()
    c.model.source = "hf:google/flan-t5-base"
    c.model.family = "t5"
    c.model.dtype = "bfloat16"
    c.data.source = "hub"
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
