"""The DPO-ST release's protocol as one base config: every number of the protocol is a field here.

`configs/*.py` start from `base_config()` and override what differs per model (learning rates,
batch sizes, mesh). Field meanings are documented inline; `python -m dpost.main --config C
--config.a.b=v` overrides any of them, and an unknown field is an error.
"""

from __future__ import annotations

import ml_collections


def optimizer_fields(**overrides) -> ml_collections.ConfigDict:
    """AdamW with linear warm-up and cosine decay to min_lr_rate * peak (the release's schedule)."""
    cfg = ml_collections.ConfigDict(
        dict(
            learning_rate=3e-4,
            weight_decay=0.01,
            warmup_ratio=0.1,
            min_lr_rate=0.1,  # cosine decays to 10% of the peak learning rate
            max_grad_norm=1.0,
            b1=0.9,
            b2=0.999,
            eps=1e-8,
            # AdamW's first moment in float32 | bfloat16 (less memory, different numerics: see
            # dpost.training.optimizer); the second moment stays float32
            moments_dtype="float32",
            # > 0: the stage's trained model is the uniform average of the params after each of its
            # last ceil(average_last x steps) updates (tail averaging, dpost.training.optimizer; one
            # more copy of the params in the optimizer state); 0 = the last iterate (the release)
            average_last=0.0,
        )
    )
    cfg.update(overrides)
    return cfg


def sampling_fields(**overrides) -> ml_collections.ConfigDict:
    cfg = ml_collections.ConfigDict(
        dict(
            num_samples=1,
            temperature=0.0,  # 0 = greedy
            top_p=1.0,
            top_k=0,
            max_new_tokens=300,
            batch_size=64,  # sequences (prompts x num_samples) per sampler batch
            calculator=True,
            shard_questions=256,  # questions per resumable sampling shard (one file each)
            # prompt-length buckets, e.g. (128, 256): fewer compiled programs, more padding;
            # () = the sampler's quarter-octave buckets (2^k x 1, 1.25, 1.5, 1.75)
            length_buckets=(),
            # static: length-sorted chunks run to their longest row | continuous: finished rows'
            # slots are refilled (same samples either way; static measured faster on CPU, BENCHMARKS)
            batching="static",
        )
    )
    cfg.update(overrides)
    return cfg


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.method = "dpo_st"  # sft (warm-up only) | st (self-training without DPO) | dpo_st
    c.mode = "train"  # train | eval (evaluate eval.checkpoint alone, writes eval.json)
    c.seed = 42  # the release's seed
    c.iterations = 3  # K
    c.progress = True  # progress bars on long stages
    # compiled XLA programs kept on disk and reused across stages, methods and runs (dpost.compile_cache):
    # "auto" = $DPOST_CACHE_DIR/xla (else ~/.cache/dpost/xla) | "off" | a directory
    c.compilation_cache = "auto"

    c.model = ml_collections.ConfigDict(
        dict(
            # hf:<dir or hub id> | gguf:<file> | orbax:<dir> | scratch (random init from model.scratch)
            # | pretrain (model.scratch pre-trained once on `pretrain.corpus`, cached; synthetic tasks)
            source="",
            family="",  # llama | t5 (needed for scratch/pretrain; read from the checkpoint otherwise)
            dtype="float32",  # compute dtype (params stay fp32 masters): float32 | bfloat16
            # what each layer keeps for the backward pass in training (dpost.models.layers.REMATS):
            # none | full (only its input: the layer is recomputed) | dots (weight-matmul outputs:
            # attention and element-wise work recomputed); True / False read as full / none
            remat=ml_collections.FieldReference(False, field_type=object),
            # training, scoring and prefill layers in one nn.scan (compile time independent of depth)
            # | False: a Python loop over the same stacked params (no per-layer copies in and out of
            # the scan's buffers; BENCHMARKS.md "Training-step options" for when it pays)
            scan_layers=True,
            # training, scoring and prefill attention: einsum (spelled out; also the path under
            # attention dropout) | fused (jax.nn.dot_product_attention: cuDNN flash attention on GPU
            # in bf16/fp16, XLA elsewhere). einsum: fused measured 1.1-2.3x slower on CPU
            # (bench/attention.py); on one H200, 1.2-1.6x faster training steps (BENCHMARKS.md)
            attention="einsum",
            # decoder-only train steps and reference scoring: the vocabulary head over this many target
            # positions at a time (0 = all at once); bounds the fp32 [rows, positions, vocab] logits
            logits_chunk=0,
            # training-time dropout in SFT (llama: attention probabilities; t5: where transformers
            # applies dropout_rate); DPO, evaluation, scoring and sampling never drop (the release's
            # DPO ran through TRL, which turns dropout off)
            dropout=0.0,
            # scratch models: family config fields (LlamaConfig / T5Config) and a tokenizer to train
            scratch=ml_collections.ConfigDict(),
        )
    )

    c.data = ml_collections.ConfigDict(
        dict(
            source="local",  # local (data.dir or $DPOST_DATA_DIR) | hub (openai/gsm8k) | synthetic
            dir="",  # folder holding gsm8k/{train,dev,test}.jsonl; "" -> $DPOST_DATA_DIR
            max_train=0,  # use only the first N training questions (0 = all)
            # the first N training questions keep their gold rationale (0 = all); the rest are
            # answer-only: sampled, paired and pseudo-labeled, but not in the warm-up SFT
            labeled=0,
            max_eval=0,  # evaluate on the first N of each eval split (0 = all)
            eval_splits=("dev", "test"),
            ood=(),  # any of multiarith, svamp, asdiv (evaluation only)
            max_prompt_len=256,
            max_target_len=384,
            synthetic=ml_collections.ConfigDict(),  # generator settings when source == synthetic
        )
    )

    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    c.sharding = ml_collections.ConfigDict(dict(rules=ml_collections.FieldReference(None, field_type=object)))

    # Warm-up and per-iteration SFT (restarts from the pre-trained model each iteration).
    c.sft = ml_collections.ConfigDict(
        dict(
            epochs=8,
            max_steps=0,  # > 0 caps the number of optimizer steps
            batch_size=96,  # global batch (sequences per optimizer step)
            grad_accum=1,
            optimizer=optimizer_fields(learning_rate=3e-4),
        )
    )

    c.dpo = ml_collections.ConfigDict(
        dict(
            beta=0.1,
            loss_type="sigmoid",  # sigmoid | ipo | hinge | robust
            label_smoothing=0.0,
            rpo_alpha=0.0,  # > 0 adds an NLL term on chosen completions
            steps=150,
            batch_size=96,  # pairs per optimizer step
            grad_accum=1,
            optimizer=optimizer_fields(learning_rate=7e-7),
            reference="precomputed",  # precomputed (harvested/scored once) | in_step
            eval_pairs=320,  # the first N pairs double as the DPO eval set
            # True: the log-prob sums leave out the tokens the calculator forces when sampling (its
            # results and closing markers), which the policy never chooses; not the release (False).
            # Needs reference=in_step.
            mask_calculator=False,
            # which completion tokens the log-prob sums count: all (the release) | through_wrong_step:
            # each side through its first step that differs from the other side's (as step-level DPO;
            # needs pairs.rejected=wrong_step and reference=in_step)
            count="all",
        )
    )

    # similarity: Jaccard over the model tokenizer's sub-word tokens (subword, the release) | words;
    # select: keep the least_similar pairs per question (the release) | most_similar (an option);
    # rejected: the incorrect sample (the release) | wrong_step: the chosen side up to the sample's
    # first wrong calculator step, then the sample from there (an option; builders.graft_at_wrong_step)
    c.pairs = ml_collections.ConfigDict(dict(max_per_question=3, dedup_threshold=0.7, similarity="subword",
                                             select="least_similar", rejected="sample"))
    c.pseudo_labels = ml_collections.ConfigDict(dict(dedup_threshold=0.7, cap_percentile=90, similarity="subword"))

    c.sampling = ml_collections.ConfigDict(
        dict(
            # top_k 50: the release sampled with transformers' generate, whose default top-k is 50
            pairs=sampling_fields(num_samples=5, temperature=0.7, top_k=50),
            labels=sampling_fields(num_samples=3, temperature=0.7, top_k=50),
            eval=sampling_fields(num_samples=1, temperature=0.0, batch_size=96),
        )
    )

    c.eval = ml_collections.ConfigDict(
        dict(
            checkpoint="",  # mode=eval: orbax:<dir> | hf:<dir> | gguf:<file>
            every_stage=True,  # evaluate SFT_k and DPO_k after each stage
            pass_at_k=0,  # > 0: also sample k rationales per question for pass@k and maj@k
            pass_at_k_temperature=0.7,
            # > 1: the run's last SFT stage is trained this many times on the same data (replicate 0 is
            # the protocol's model; replicate j its seed salted by j), each evaluated; the run's final
            # accuracy is their mean: the last stage's own training noise averaged out of a comparison.
            # No stage depends on it: rerunning a finished run with more replicates adds only them
            final_replicates=1,
        )
    )

    # model.source=pretrain: M0 = model.scratch trained once on a synthetic corpus (dpost.pretrain),
    # cached by content hash and shared by every method and seed; its own seed, not the run's.
    c.pretrain = ml_collections.ConfigDict(
        dict(
            corpus=ml_collections.ConfigDict(dict(n=6000, seed=2024, min_steps=1, max_steps=2)),  # + Difficulty fields
            seed=0,
            epochs=4,
            max_steps=0,  # > 0 caps the number of optimizer steps
            batch_size=32,
            optimizer=optimizer_fields(learning_rate=3e-3),
            checkpoint_every=500,
            cache_dir="",  # "" -> $DPOST_CACHE_DIR, else ~/.cache/dpost
        )
    )

    c.checkpoint = ml_collections.ConfigDict(dict(every_steps=200, keep=2))
    c.log_every = 10
    return c
