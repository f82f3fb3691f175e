"""CPU default: DPO-ST on a synthetic multi-step arithmetic task with a tiny pre-trained Llama.

    python -m dpost.main --config configs/arith_tiny.py --workdir runs/arith_tiny

The whole loop (warm-up SFT, 3 iterations of sample -> pairs -> DPO -> sample -> pseudo-labels -> SFT)
runs in minutes on 2 CPU cores. M0 is pre-trained once on a synthetic corpus of 1-2 step problems
with other names (`dpost.pretrain`, cached by content hash, shared by every method and seed), so
that every SFT_k restarting from M0 is the well-conditioned fine-tune the protocol assumes. The task's
rationales are sentences in several phrasings (`synthetic.Difficulty.style`), so distinct correct
samples stay distinct under the release's sub-word Jaccard de-duplication.

How the settings were chosen (docs/experiments.md, the first final), on the dev split with seed 0
of seeds 0-2, before the final comparison ran seeds 3-7 on test with this file's settings unchanged:
- task 2-3 steps, 500 training questions: warm-up dev 41.5% (3-4 or 3-5 steps: 6-8% at 3 epochs;
  1,000 questions at 8 epochs: 96.5%, no room for the methods to show);
- warm-up and SFT_k: 4 epochs at batch 32, lr 2e-3 (one seed's three methods in 14 minutes on dev);
- DPO lr 1e-5 until the fourth final (below) (of 5e-5, 5e-5 + rpo_alpha 1, 2e-5 + rpo_alpha 1): the one whose DPO_1 kept
  greedy dev accuracy (47% vs SFT_0's 41.5%; 5e-5 fell to 28%) and whose samples had the highest
  pass@n on the training questions (35.6% vs 33.2% for SFT_0's samples);
- DPO 40 steps (of 40, 80, 160 at lr 1e-5; dev seeds 0-2, after the final): more steps raised the
  reward margin but lowered the DPO model's samples' pass@n (+3.3, -0.5, -5.3 points against SFT_0's);
- kept after a later dev screen (seeds 0-2, iteration 1) against an NLL term on the chosen side at 80
  steps (`dpo.rpo_alpha=1`: pass@n gain +2.3) and the most similar pairs (`pairs.select`: +0.6),
  and a third against DPO beta 0.25 and 0.5 (+2.3 each; the policy moved no further: AdamW cancels
  beta's gradient scale); on another machine's M0 (dev seeds 0-2, gain of the config +0.7), against
  `dpo.mask_calculator` (pass@3 0.9 points below the config's) and a 2.4x larger model (gain -0.3).
Three finals with these settings on test (seeds 3-7, 8-12, 13-17; docs/experiments.md): ST beats
SFT by about 42 points; DPO-ST - ST is +1.2 points over all fifteen seeds, 95% CI [-1.0, +3.2]: no
difference.
- DPO at the first wrong step (the fourth final only, seeds 18-22; not the release's pairs): each
  pair's rejected side is grafted at the incorrect sample's first wrong calculator step
  (`pairs.rejected=wrong_step`), DPO counts each side only through that step
  (`dpo.count=through_wrong_step`, `dpo.reference=in_step`), at the release's rate 5e-5 with an NLL
  term on the chosen step (`dpo.rpo_alpha=1`). Chosen on dev seeds 0-2 at iteration 1, by a rule
  written before the runs (pass@3 of DPO_1's label samples >= 2 points above the previous config's,
  in 2 of 3 seeds): 39.6% against 36.9%; of five candidates, the grafted pairs alone gave +0.3, with
  step-only counting +0.9, at lr 5e-5 without the NLL term -2.5 and at 2e-4 -18.9 (the chosen
  step's likelihood fell with the rejected one's). Fourth final (seeds 18-22, test, this config):
  DPO-ST - ST +0.6 points, 95% CI [-2.4, +3.6]: no difference (docs/experiments.md).
- Since the fifth final (seeds 23-27): the release's sequence-level DPO again (lr 1e-5, no NLL
  term, as in finals 1-3), and no pseudo-label cap (`pseudo_labels.cap_percentile=100`, not the
  release: every distinct, de-duplicated correct sample is kept). Dev screens over all three
  iterations (seeds 0-2, rule written before the runs: DPO-ST - ST >= +2 points on dev on average
  and in 2 of 3 seeds, more labels beyond gold): no cap with the step-level DPO above, +0.2; 10 label
  samples (`sampling.labels.num_samples=10`), -10.0 and -3.0 on seeds 0-1; no cap with the
  sequence-level DPO, run as a diagnostic of the step-level DPO's loss of sample diversity (its
  samples repeat the gold's wording; docs/experiments.md, "the pseudo-label funnel"), +5.7 (+9.0, +5.5, +2.5;
  beyond gold +2, +67, +90 by iteration): it met the rule and became this config after the fact,
  disclosed as such. Fifth final (seeds 23-27, test, this config): DPO-ST - ST +1.6 points, 95% CI
  [-4.7, +7.7]: no difference (docs/experiments.md). Sixth final (seeds 28-41, this config
  unchanged, pre-registered for power): +0.6, 95% CI [-1.8, +2.9]; seeds 23-41 pooled: +0.8, 97.5%
  CI [-1.9, +3.6]: no difference (docs/experiments.md). Seventh final (seeds 42-48, this config
  unchanged, pre-registered, each run's final accuracy the mean over four trainings of its last SFT
  stage: `--config.eval.final_replicates=4`): DPO-ST - ST +2.2, 95% CI [+0.5, +4.0] (98.33%: [+0.0,
  +4.3]); the protocol's models alone (replicate 0) +0.1 [-2.1, +2.3] (README). Eighth final (seeds
  50-57, the seventh's plan unchanged, pre-registered as its confirmation): +0.3 [-2.6, +3.1], not
  confirmed; seeds 42-57 pooled +1.2 [-0.7, +3.0]: no difference (docs/experiments.md). Ninth final
  (seeds 60-74, this config unchanged, pre-registered, the protocol's models): +0.0 [-2.8, +2.7];
  every config-C seed pooled (finals 5-9, 49 seeds, the protocol's models): +0.2 [-1.3, +1.7] (99%:
  [-1.7, +2.1]): no difference (README).
Finals 1-3 fine-tuned one M0 and finals 4-9 another of the same recipe (`pretrain.seed=0`); on
dev, M0s drawn with `pretrain.seed` 1 and 2 moved ST's final from 82% to 94% and 49.5%
(docs/experiments.md): these results hold for those M0s.
`model.remat=full` came after finals 1-3: for speed (one seed 0.92x the time), the same math with
other fp32 rounding, so a seed's numbers can differ slightly from those finals' tables.
"""

from dpost import defaults


def get_config():
    c = defaults.base_config()
    c.seed = 0
    c.model.source = "pretrain"
    c.model.family = "llama"
    # Recompute each layer's forward in the backward pass: at this model's stage shapes (batch 32,
    # 112 + 144 tokens) the saved attention probabilities cost more to stack and reload than to
    # recompute (BENCHMARKS, "Training-step options"). M0's pre-training ignores it (dpost.pretrain).
    c.model.remat = "full"
    c.model.scratch = dict(
        hidden_size=96, intermediate_size=256, num_layers=2, num_heads=6, num_kv_heads=2, head_dim=16,
        rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=True, max_position_embeddings=512,
        tokenizer_vocab_size=1024,
    )
    c.pretrain.corpus = dict(n=6000, seed=2024, min_steps=1, max_steps=2, max_start=20, max_operand=9,
                             max_factor=4, max_value=200, commute=0.2)
    c.pretrain.epochs = 4
    c.pretrain.batch_size = 32
    c.pretrain.optimizer.learning_rate = 3e-3

    c.data.source = "synthetic"
    # n_test_extra: test questions drawn after train and dev, appended to test (train, dev and the
    # first n_test unchanged): more held-out questions for a comparison's power, nothing else.
    c.data.synthetic = dict(n_train=500, n_dev=200, n_test=500, n_test_extra=0, min_steps=2, max_steps=3,
                            max_start=20, max_operand=9, max_factor=4, max_value=200, commute=0.2)
    c.data.eval_splits = ("dev", "test")
    c.data.max_prompt_len = 128
    c.data.max_target_len = 160

    c.sft.epochs = 4
    c.sft.batch_size = 32
    c.sft.optimizer.learning_rate = 2e-3
    c.dpo.steps = 40
    c.dpo.batch_size = 32
    c.dpo.optimizer.learning_rate = 1e-5
    # Not the release: keep every distinct correct sample (docstring), so the cap cannot fall as
    # DPO spreads correct samples over more questions.
    c.pseudo_labels.cap_percentile = 100
    c.dpo.eval_pairs = 64
    for name in ("pairs", "labels", "eval"):
        c.sampling[name].max_new_tokens = 144
        c.sampling[name].batch_size = 256
    c.eval.every_stage = False  # DPO_k is not evaluated greedily (its samples' pass rates are reported)
    c.checkpoint.every_steps = 250
    return c
