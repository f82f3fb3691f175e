"""CPU default: DPO-ST on a synthetic multi-step arithmetic task with a tiny Llama trained from scratch.

The whole loop (warm-up SFT, 3 iterations of sample -> pairs -> DPO -> sample -> pseudo-labels -> SFT)
runs in minutes on 2 CPU cores. The task and model were fixed on warm-up SFT alone, before any
ST / DPO-ST result was looked at (README, "CPU default"): with operands written in either order
(commute=0.2, so questions have several correct rationales) a 64-wide model at lr 1e-2 reached only
10-11% test accuracy and at lr 3e-3 12-19%; 96 wide at lr 3e-3 reached 39-64% (seeds 1, 0).
The DPO learning rate was chosen on dev with seed 0 (2e-4 halved greedy accuracy; 5e-5 kept it).
"""

from dpost import defaults


def get_config():
    c = defaults.base_config()
    c.seed = 0
    c.model.source = "scratch"
    c.model.family = "llama"
    c.model.scratch = dict(
        hidden_size=96, intermediate_size=256, num_layers=2, num_heads=6, num_kv_heads=2, head_dim=16,
        rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=True, max_position_embeddings=512,
        tokenizer_vocab_size=1024,
    )
    c.data.source = "synthetic"
    c.data.synthetic = dict(n_train=1000, n_dev=200, n_test=500, min_steps=2, max_steps=3, max_start=20,
                            max_operand=9, max_factor=4, max_value=200, commute=0.2)
    c.data.eval_splits = ("dev", "test")
    c.data.max_prompt_len = 128
    c.data.max_target_len = 128

    # Calibrated on warm-up SFT alone (dev accuracy 59.5% with seed 0, 42% with seed 1).
    c.sft.epochs = 12
    c.sft.max_steps = 750  # every SFT stage gets the warm-up's compute, also on larger pseudo-label sets
    c.sft.batch_size = 16
    c.sft.optimizer.learning_rate = 3e-3
    c.dpo.steps = 40
    c.dpo.batch_size = 32
    c.dpo.optimizer.learning_rate = 5e-5
    c.dpo.eval_pairs = 64
    for name in ("pairs", "labels", "eval"):
        c.sampling[name].max_new_tokens = 96
        c.sampling[name].batch_size = 256
    c.checkpoint.every_steps = 250
    return c
