"""The DPO-ST stages, one function each; `driver.py` calls them in the paper's order.

Every stage writes its outputs into its own `StageDir` and returns (its result, its manifest's
fields); the driver runs it through `StageDir.cached`, which writes the manifest, so a rerun skips
it and reads its result back (`load_stage_model`, `read_samples`, `read_pairs`, `read_labels`).
Training stages resume from their last Orbax checkpoint; sampling resumes from its last completed
shard file. Multi-host: training is SPMD over the global mesh (each host feeds its part
of every global batch); sampling shards are split across hosts, each host samples its shards on a
host-local mesh of its own devices (params brought there by one reshard) and writes their files,
and after a barrier every host reads all shard files from the shared workdir. Other files are
written by process 0 only.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import numpy as np
import logging

from dpost import distributed, faults, models, sampling, training
from dpost.data import batching, builders, formatting, pipeline
from dpost.data.gsm8k import Example
from dpost.distributed import barrier
from dpost.models.bundle import ModelBundle
from dpost.sampling import forcing
from dpost.sharding import Layout
from dpost.workdir import StageDir, read_jsonl, write_jsonl_atomic

log = logging.getLogger(__name__)

MODEL_DIR = "model"
CKPT_DIR = "checkpoints"
PAIRS_FILE = "pairs.jsonl"
LABELS_FILE = "labels.jsonl"


# -- helpers ---------------------------------------------------------------------------------------

def num_params(params) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


def stage_seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0] % (2**31 - 1))


def load_stage_model(stage: StageDir, layout: Layout, dtype: str) -> ModelBundle:
    return models.load(f"orbax:{stage.path / MODEL_DIR}", dtype=dtype, layout=layout)


def optimizer_config(opt_cfg, total_steps: int) -> training.OptimizerConfig:
    return training.OptimizerConfig(
        learning_rate=opt_cfg.learning_rate, total_steps=total_steps, weight_decay=opt_cfg.weight_decay,
        warmup_ratio=opt_cfg.warmup_ratio, min_lr_rate=opt_cfg.min_lr_rate,
        max_grad_norm=opt_cfg.max_grad_norm or None, b1=opt_cfg.b1, b2=opt_cfg.b2, eps=opt_cfg.eps,
        moments_dtype=opt_cfg.moments_dtype, average_last=opt_cfg.average_last,
    )


def prompt_ids(bundle: ModelBundle, question: str) -> list[int]:
    return pipeline.encode_prompt(bundle.tokenizer, bundle.family, formatting.format_prompt(bundle.family, question))


def _train_state(bundle: ModelBundle, optimizer, seed: int, layout: Layout):
    shardings = None
    if layout.mesh is not None:
        boxed = models.sources.abstract_params(models.get_family(bundle.family), bundle.config)
        shardings = training.state_shardings(layout.params(boxed), optimizer, jax.tree.map(lambda x: x, bundle.params),
                                             layout)
    return training.create_train_state(bundle.params, optimizer, rng=seed, shardings=shardings), shardings


def _save_model(bundle: ModelBundle, params, stage: StageDir) -> ModelBundle:
    trained = bundle.replace(params=params, source=f"orbax:{stage.path / MODEL_DIR}")
    models.save_orbax(trained, str(stage.path / MODEL_DIR))
    return trained


# -- sampling ----------------------------------------------------------------------------------------

def prompts_per_batch(scfg) -> int:
    """Config batch sizes count sequences; the sampler batches prompts of num_samples rows each."""
    return max(1, scfg.batch_size // scfg.num_samples)


def sampling_layout(layout: Layout) -> Layout:
    """Sampling shards are split across hosts, so each host samples on its own devices: the global
    layout on one host, else the same rules on a host-local mesh (same axis names) of this host's devices."""
    if layout.mesh is None or jax.process_count() == 1:
        return layout
    return layout.on(distributed.host_local_mesh(layout.mesh))


def bundle_on(bundle: ModelBundle, layout: Layout) -> ModelBundle:
    """The bundle with its params laid out by `layout` (a collective when the params are multi-host:
    every host must call it, also one with nothing left to sample)."""
    if layout.mesh is None or bundle.mesh is None or layout == bundle.layout:
        return bundle
    boxed = models.sources.abstract_params(models.get_family(bundle.family), bundle.config)
    local = layout.params(boxed)
    return bundle.replace(params=distributed.params_to_host_local(bundle.params, local), layout=layout)


def sample_stage(bundle: ModelBundle, examples: Sequence[Example], scfg, stage: StageDir, *, seed: int,
                 layout: Layout = Layout(), progress: bool = True) -> tuple[dict[str, list[dict]], dict]:
    """Samples `scfg.num_samples` rationales per question; resumable shard by shard. With several
    hosts, shard i is sampled (and its file written) by host i % process_count on its local mesh;
    after a barrier every host reads all shard files from the shared workdir. Returns the samples
    per question id (`read_samples`) and the manifest fields."""
    layout = sampling_layout(layout)
    sampler = bundle_on(bundle, layout)
    size = scfg.shard_questions
    shards = [examples[i : i + size] for i in range(0, len(examples), size)]
    for index, shard in enumerate(shards):
        if index % jax.process_count() != jax.process_index():
            continue  # another host samples this shard
        path = stage.path / f"shard_{index:05d}.jsonl"
        if path.exists():
            continue
        prompts = [prompt_ids(bundle, ex.question) for ex in shard]
        outputs = sampling.generate(
            sampler, prompts, num_samples=scfg.num_samples, max_new_tokens=scfg.max_new_tokens,
            temperature=scfg.temperature, top_p=scfg.top_p, top_k=scfg.top_k, seed=stage_seed(seed, index),
            calculator=scfg.calculator, layout=layout, batch_size=prompts_per_batch(scfg), progress=progress,
            length_buckets=scfg.length_buckets or None, batching=scfg.batching,
        )
        rows = []
        for ex, prompt, outs in zip(shard, prompts, outputs):
            rows.append({"id": ex.id, "prompt_tokens": len(prompt), "samples": [
                {"text": s.text, "token_ids": list(map(int, s.token_ids)),
                 "logprob": float(np.sum(s.token_logprobs)), "finish_reason": s.finish_reason}
                for s in outs
            ]})
        write_jsonl_atomic(path, rows)
        log.info("%s: shard %d/%d written", stage.path, index + 1, len(shards))
        faults.after_shard(stage.path, index)
    barrier(f"sampled {stage.path}")
    # FLOPs from every shard file (also those written before a resume or by other hosts).
    tokens = sum(row.get("prompt_tokens", 0) + sum(len(x["token_ids"]) for x in row["samples"])
                 for path in stage.path.glob("shard_*.jsonl") for row in read_jsonl(path))
    n_samples = len(examples) * scfg.num_samples
    samples = read_samples(stage)
    rates = builders.pass_rates(question_samples(examples, [samples]))
    return samples, dict(samples=n_samples, num_samples=scfg.num_samples,
                         flops=2.0 * num_params(bundle.params) * tokens, shards=len(shards), **rates)


def read_samples(stage: StageDir) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for path in sorted(stage.path.glob("shard_*.jsonl")):
        for row in read_jsonl(path):
            out[row["id"]] = row["samples"]
    return out


def question_samples(examples: Sequence[Example], rounds: Sequence[dict[str, list[dict]]]) -> list[builders.QuestionSamples]:
    """Pools the sampled texts of several rounds (current and earlier models) per question."""
    return [
        builders.QuestionSamples(ex.id, ex.question, ex.answer, ex.gold,
                                 [s["text"] for r in rounds for s in r.get(ex.id, [])])
        for ex in examples
    ]


# -- preference pairs and pseudo-labels ------------------------------------------------------------

def similarity_tokens(similarity: str, tokenizer) -> builders.Tokenize | None:
    """The tokens of the builders' Jaccard similarity: the model tokenizer's sub-word pieces (the
    release's rule) or whitespace words (None)."""
    if similarity not in builders.SIMILARITIES:
        raise ValueError(f"similarity must be one of {builders.SIMILARITIES}, got {similarity!r}")
    return tokenizer.tokenize if similarity == "subword" else None


def pairs_stage(examples, rounds, current_round: dict[str, list[dict]], family: str, cfg, stage: StageDir,
                tokenizer) -> tuple[list[dict], dict]:
    """Builds pairs; each side carries the reference's summed log-prob and token ids when it was
    sampled by the reference model itself (this round), so DPO needs no second pass for it.
    Returns the pair rows (`read_pairs`) and the manifest fields."""
    pairs = builders.build_pairs(question_samples(examples, rounds), family,
                                 max_pairs_per_question=cfg.pairs.max_per_question,
                                 dedup_threshold=cfg.pairs.dedup_threshold,
                                 tokenize=similarity_tokens(cfg.pairs.similarity, tokenizer),
                                 select=cfg.pairs.select, rejected=cfg.pairs.rejected)
    harvested = {}
    for qid, samples in current_round.items():
        for s in samples:
            harvested.setdefault((qid, s["text"]), s)
    rows = []
    for p in pairs:
        row = {"id": p.id, "question": p.prompt_question, "chosen": p.chosen, "rejected": p.rejected}
        if p.chosen_step_end is not None:
            row.update(chosen_step_end=p.chosen_step_end, rejected_step_end=p.rejected_step_end)
        for side in ("chosen", "rejected"):
            hit = harvested.get((p.id, row[side]))
            row[f"{side}_ref"] = None if hit is None else hit["logprob"]
            row[f"{side}_ids"] = None if hit is None else hit["token_ids"]
        rows.append(row)
    if jax.process_index() == 0:
        write_jsonl_atomic(stage.path / PAIRS_FILE, rows)
    with_negative = len({p.id for p in pairs})
    return rows, dict(pairs=len(pairs), questions_with_pairs=with_negative, questions=len(examples))


def labels_stage(examples, rounds, family: str, cfg, stage: StageDir, tokenizer) -> tuple[list[dict], dict]:
    """Builds pseudo-labels; returns their rows (`read_labels`) and the manifest fields."""
    built = builders.build_pseudo_labels(question_samples(examples, rounds), family,
                                         dedup_threshold=cfg.pseudo_labels.dedup_threshold,
                                         cap_percentile=cfg.pseudo_labels.cap_percentile,
                                         tokenize=similarity_tokens(cfg.pseudo_labels.similarity, tokenizer))
    rows = [dataclasses.asdict(l) for l in built.labels]
    if jax.process_index() == 0:
        write_jsonl_atomic(stage.path / LABELS_FILE, rows)
    return rows, dict(pseudo_labels=len(built.labels), questions=len({l.id for l in built.labels}),
                      beyond_gold=built.beyond_gold, correct_samples=built.correct,
                      distinct_samples=built.distinct, after_dedup=built.after_dedup, cap=built.cap)


def read_pairs(stage: StageDir) -> list[dict]:
    return read_jsonl(stage.path / PAIRS_FILE)


def read_labels(stage: StageDir) -> list[dict]:
    return read_jsonl(stage.path / LABELS_FILE)


def gold_labels(examples: Sequence[Example], family: str) -> list[tuple[str, str]]:
    """The warm-up's training set: the questions that keep their gold rationale (`data.labeled`)."""
    return [formatting.format_example(family, ex) for ex in examples if ex.answer]


# -- training --------------------------------------------------------------------------------------

def _stage_lengths(items: Sequence[dict], keys: Sequence[str], max_p: int, max_c: int) -> tuple[int, int]:
    """One (prompt, completion) shape for the whole stage, from its longest rows."""
    return (batching.stage_length(max(len(it["prompt"]) for it in items), max_p),
            batching.stage_length(max(len(it[k]) for it in items for k in keys), max_c))


def sft_stage(base: ModelBundle, examples: Sequence[tuple[str, str]], cfg, stage: StageDir, *, seed: int,
              layout: Layout = Layout()) -> tuple[ModelBundle, dict]:
    """SFT from `base` on (prompt_text, target_text) pairs; resumes from the stage's checkpoints.
    Returns the trained model and the manifest fields."""
    tok = pipeline.tokenize_examples(examples, base.tokenizer, base.family,
                                     max_prompt_len=cfg.data.max_prompt_len, max_completion_len=cfg.data.max_target_len)
    if not tok.items:
        raise ValueError(f"{stage.path}: no SFT example fits {cfg.data.max_prompt_len}/{cfg.data.max_target_len} tokens")
    batch_size = min(cfg.sft.batch_size, len(tok.items) // jax.process_count() * jax.process_count())
    steps = training.steps_for_epochs(len(tok.items), batch_size, cfg.sft.epochs)
    if cfg.sft.max_steps:
        steps = min(steps, cfg.sft.max_steps)
    steps = max(1, steps)
    opt_cfg = optimizer_config(cfg.sft.optimizer, steps)
    optimizer = training.make_optimizer(opt_cfg)
    state, shardings = _train_state(base, optimizer, seed, layout)
    step = training.make_sft_step(base.module, optimizer, lr_schedule=training.make_schedule(opt_cfg),
                                  grad_accum=cfg.sft.grad_accum, layout=layout, state_shardings=shardings,
                                  logits_chunk=cfg.model.logits_chunk or None, dropout=cfg.model.dropout)
    p_len, c_len = _stage_lengths(tok.items, ["completion"], cfg.data.max_prompt_len, cfg.data.max_target_len)
    pad = base.pad_token_id
    data = pipeline.make_loader(tok.items, batch_size=batch_size // jax.process_count(), pad_id=pad,
                                max_prompt_len=p_len, max_completion_len=c_len, seed=seed, shuffle=True,
                                num_epochs=None)
    result = training.run(
        step, state, data,
        training.LoopConfig(num_steps=steps, log_every=cfg.log_every, save_every=cfg.checkpoint.every_steps,
                            keep=cfg.checkpoint.keep, progress=cfg.progress, name=stage.path.parent.name + "/sft"),
        workdir=str(stage.path), checkpoint_dir=str(stage.path / CKPT_DIR), layout=layout,
        pad_to=(p_len, c_len), pad_id=pad,
    )
    trained = _save_model(base, training.final_params(result.state.params, result.state.opt_state), stage)
    last = result.history[-1] if result.history else {}
    tokens_per_step = _tokens_per_step(tok.items, batch_size, ["completion"])
    return trained, dict(
        examples=len(tok.items), filtered=tok.num_filtered, steps=steps,
        flops=6.0 * num_params(base.params) * tokens_per_step * steps,
        final_loss=last.get("loss"),
    )


def _tokens_per_step(items, batch_size: int, keys) -> float:
    per_item = np.mean([len(it["prompt"]) * len(keys) + sum(len(it[k]) for k in keys) for it in items])
    return float(per_item * batch_size)


def _pair_items(bundle: ModelBundle, rows: Sequence[dict], max_p: int, max_c: int):
    """Token items for pairs: harvested sampler ids where present, tokenized text otherwise."""
    items, refs, kept = [], [], []
    for row in rows:
        prompt = prompt_ids(bundle, row["question"])
        item = {"prompt": np.asarray(prompt, np.int32)}
        ref = []
        for side in ("chosen", "rejected"):
            ids = row.get(f"{side}_ids")
            if ids is None:
                ids = pipeline.encode_completion(bundle.tokenizer, bundle.family,  # as SFT tokenizes it
                                                 formatting.format_prompt(bundle.family, row["question"]), row[side])
            item[side] = np.asarray(ids, np.int32)
            ref.append(row.get(f"{side}_ref"))
        if len(prompt) <= max_p and len(item["chosen"]) <= max_c and len(item["rejected"]) <= max_c:
            items.append(item)
            refs.append(ref)
            kept.append(row)
    return items, refs, kept


def _pair_arrays(items, pad_id, p_len, c_len) -> dict[str, np.ndarray]:
    batch = pipeline.collate(items, pad_id=pad_id, max_prompt_len=p_len, max_completion_len=c_len,
                             keys=("chosen", "rejected"))
    return batching.pad_to_lengths(batch, p_len, c_len, pad_id)


DPO_COUNTS = ("all", "through_wrong_step")  # `dpo.count`: which completion tokens DPO's sums count


def dpo_stage(policy: ModelBundle, pair_rows: Sequence[dict], cfg, stage: StageDir, *, seed: int,
              layout: Layout = Layout()) -> tuple[ModelBundle, dict]:
    """DPO_k: init and reference = SFT_{k-1}. Reference log-probs come from the sampler for the
    reference's own samples; the rest (gold rationales, earlier rounds) are scored once here.
    Returns the trained model and the manifest fields."""
    items, refs, rows = _pair_items(policy, pair_rows, cfg.data.max_prompt_len, cfg.data.max_target_len)
    if not items:
        raise ValueError(f"{stage.path}: no preference pair fits the length limits; nothing to train DPO on")
    pad = policy.pad_token_id
    p_len, c_len = _stage_lengths(items, ["chosen", "rejected"], cfg.data.max_prompt_len, cfg.data.max_target_len)
    arrays = _pair_arrays(items, pad, p_len, c_len)
    if cfg.dpo.mask_calculator:
        arrays.update(_calculator_loss_masks(policy, items, arrays))
    if cfg.dpo.count == "through_wrong_step":
        arrays.update(_wrong_step_loss_masks(policy, rows, items, arrays))
    ref_c = np.array([np.nan if r[0] is None else r[0] for r in refs], np.float32)
    ref_r = np.array([np.nan if r[1] is None else r[1] for r in refs], np.float32)
    harvested = int((~np.isnan(ref_c)).sum() + (~np.isnan(ref_r)).sum())
    wanted = [(int(i), "chosen") for i in np.flatnonzero(np.isnan(ref_c))] + \
             [(int(i), "rejected") for i in np.flatnonzero(np.isnan(ref_r))]
    if wanted:  # only the sides the sampler did not score (gold rationales, earlier rounds' samples)
        # on this host's devices (multi-host: outputs of the global mesh are not fetchable)
        scores = _score_sides(bundle_on(policy, sampling_layout(layout)), arrays, wanted,
                              logits_chunk=cfg.model.logits_chunk or None)
        for (i, side), score in zip(wanted, scores):
            (ref_c if side == "chosen" else ref_r)[i] = score
    arrays["ref_chosen_logps"], arrays["ref_rejected_logps"] = ref_c, ref_r

    batch_size = min(cfg.dpo.batch_size, len(items) // jax.process_count() * jax.process_count())
    steps = cfg.dpo.steps
    opt_cfg = optimizer_config(cfg.dpo.optimizer, steps)
    optimizer = training.make_optimizer(opt_cfg)
    dcfg = training.DPOConfig(beta=cfg.dpo.beta, loss_type=cfg.dpo.loss_type, label_smoothing=cfg.dpo.label_smoothing,
                              rpo_alpha=cfg.dpo.rpo_alpha or None,
                              reference=cfg.dpo.reference)
    state, shardings = _train_state(policy, optimizer, seed, layout)
    step = training.make_dpo_step(policy.module, optimizer, dcfg, lr_schedule=training.make_schedule(opt_cfg),
                                  grad_accum=cfg.dpo.grad_accum, layout=layout, state_shardings=shardings,
                                  ref_shardings=shardings.params if shardings is not None else None,
                                  logits_chunk=cfg.model.logits_chunk or None)
    step_fn = step
    if dcfg.reference == "in_step":
        ref_params = policy.params
        step_fn = lambda s, b: step(s, b, ref_params)  # noqa: E731
    data = pipeline.make_array_loader(arrays, batch_size=batch_size // jax.process_count(), seed=seed)

    eval_step = training.make_dpo_eval_step(policy.module, dcfg, layout=layout,
                                            logits_chunk=cfg.model.logits_chunk or None)
    eval_batches = [distributed.host_rows(b) for b in _eval_batches(arrays, cfg.dpo.eval_pairs, batch_size)]

    def eval_fn(st):
        return training.evaluate_dpo(eval_step, st.params, eval_batches,
                                     ref_params=policy.params if dcfg.reference == "in_step" else None,
                                     layout=layout)

    result = training.run(
        step_fn, state, data,
        training.LoopConfig(num_steps=steps, log_every=cfg.log_every, save_every=cfg.checkpoint.every_steps,
                            keep=cfg.checkpoint.keep, progress=cfg.progress, name=stage.path.parent.name + "/dpo"),
        workdir=str(stage.path), checkpoint_dir=str(stage.path / CKPT_DIR), eval_fn=eval_fn, layout=layout,
    )
    trained = _save_model(policy, training.final_params(result.state.params, result.state.opt_state), stage)
    last_eval = result.eval_history[-1] if result.eval_history else {}
    n = num_params(policy.params)
    tokens_per_step = _tokens_per_step(items, batch_size, ["chosen", "rejected"])
    ref_flops = 2.0 * n * tokens_per_step * steps if dcfg.reference == "in_step" else 0.0
    return trained, dict(
        pairs=len(items), filtered=len(pair_rows) - len(items), steps=steps, harvested_reference_logps=harvested,
        flops=6.0 * n * tokens_per_step * steps + ref_flops,
        eval={k: float(v) for k, v in last_eval.items() if k != "step"},
    )


def _wrong_step_loss_masks(bundle: ModelBundle, rows, items, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`dpo.count=through_wrong_step`: per side, the loss mask (the calculator's, where present) cut
    after the tokens of the side's text through its first differing step (`builders.graft_at_wrong_step`);
    a side whose ids do not start with that text's tokens (a sampler's own tokenization) counts whole."""
    masks, whole = {}, 0
    eos = pipeline.special_ids(bundle.tokenizer)[1]
    for side in ("chosen", "rejected"):
        keep = arrays.get(side + "_loss_mask", arrays[side + "_mask"]).copy()
        for r, (row, item) in enumerate(zip(rows, items)):
            end = row.get(side + "_step_end")
            if end is None or end >= len(row[side]):
                continue
            through = pipeline.encode_completion(bundle.tokenizer, bundle.family,
                                                 formatting.format_prompt(bundle.family, row["question"]),
                                                 row[side][:end])
            through = through[: len(through) - (eos is not None)]  # without its EOS
            if list(item[side][: len(through)]) != through:
                whole += 1
                continue
            keep[r, len(through):] = False
        masks[side + "_loss_mask"] = keep
    if whole:
        log.info("dpo.count=through_wrong_step: %d pair sides counted whole (ids differ from the text's tokens)", whole)
    return masks


def _calculator_loss_masks(bundle: ModelBundle, items, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`dpo.mask_calculator`: per side, the completion mask without the tokens the calculator
    forces when sampling (the DPO steps sum log-probs over `<side>_loss_mask` when present)."""
    tables = forcing.tables_for(bundle.tokenizer, bundle.family, int(bundle.config.vocab_size))
    masks = {}
    for side in ("chosen", "rejected"):
        keep = arrays[side + "_mask"].copy()
        for row, item in enumerate(items):
            ids = item[side]
            keep[row, : len(ids)] &= ~forcing.forced_positions(bundle.tokenizer, bundle.family, ids, tables)
        masks[side + "_loss_mask"] = keep
    return masks


def _eval_batches(arrays: dict[str, np.ndarray], n_eval: int, batch_size: int) -> list[dict[str, np.ndarray]]:
    """The release's DPO eval set, exactly its first `n_eval` pairs, in batches of one shape (the
    last one filled with rows marked invalid, not counted)."""
    n_eval = min(n_eval, len(arrays["prompt"]))
    return [batching.fill_batch({k: v[start : min(start + batch_size, n_eval)] for k, v in arrays.items()}, batch_size)
            for start in range(0, n_eval, batch_size)]


def _score_sides(bundle: ModelBundle, arrays: dict[str, np.ndarray], wanted: Sequence[tuple[int, str]],
                 batch_size: int = 32, logits_chunk: int | None = None) -> np.ndarray:
    """Summed log-probs of the (pair row, "chosen" | "rejected") completions in `wanted`, in batches
    of one fixed shape (one compiled program; the last batch's filler rows are dropped).
    Chosen and rejected share one padded width, as `_pair_arrays` makes them."""
    rows = np.array([i for i, _ in wanted])
    columns = {"prompt": arrays["prompt"][rows], "prompt_mask": arrays["prompt_mask"][rows],
               "completion": np.stack([arrays[side][i] for i, side in wanted]),
               "completion_mask": np.stack([arrays[side + "_mask"][i] for i, side in wanted])}
    bs = min(batch_size, len(wanted))
    out = []
    for start in range(0, len(wanted), bs):
        chunk = {k: v[start : start + bs] for k, v in columns.items()}
        rows_here = len(chunk["prompt"])
        chunk = batching.fill_batch(chunk, bs)
        scores = models.scoring.padded_sequence_logprobs(
            bundle, chunk["prompt"], chunk["prompt_mask"], chunk["completion"], chunk["completion_mask"], logits_chunk)
        out.append(scores[:rows_here])
    return np.concatenate(out).astype(np.float32)
