"""The DPO-ST iteration loop (Wang, Li & Lu, ACL 2024), read top-down as in the paper:

    SFT_0 = SFT(M0, labeled)                                       # warm-up
    for k in 1..K:
        S     = sample(SFT_{k-1}, train questions)                 # n=5, T=0.7, calculator on
        P     = preference_pairs(S + earlier SFT samples, gold)
        DPO_k = DPO(init = SFT_{k-1}, reference = SFT_{k-1}, P)
        S'    = sample(DPO_k, train questions)                     # n=3, T=0.7
        L     = pseudo_labels(S' + earlier DPO samples, gold)
        SFT_k = SFT(M0, L)                                         # restarts from M0
        evaluate SFT_k (and DPO_k)

`method=st` drops the DPO step (pseudo-labels come from SFT_{k-1}); `method=sft` stops after the
warm-up. Each stage is one call into `dpost.stages` writing WORKDIR/iter_<k>/<stage>/; finished
stages are skipped on rerun, unfinished ones resume (see `dpost.workdir`).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import jax
import logging
from etils import epath

from dpost import config_check, evaluation, models, plan, pretrain, reports, sharding, stages
from dpost.data import formatting
from dpost.data.task import Task, load_task
from dpost.models.bundle import ModelBundle
from dpost.workdir import RunDir, StageDir, absolute

log = logging.getLogger(__name__)

@dataclasses.dataclass
class Run:
    """What every stage of one run shares."""

    config: Any
    rundir: RunDir
    task: Task
    base: ModelBundle  # M0: every SFT_k restarts from it
    mesh: Any
    rules: Any
    pretrain: dict | None = None  # model.source=pretrain: M0's pre-training (time, FLOPs, cache)

    @property
    def family(self) -> str:
        return self.base.family

    def stage(self, iteration: int, name: str) -> StageDir:
        return self.rundir.stage(iteration, name)

    def load(self, stage: StageDir) -> ModelBundle:
        return stages.load_stage_model(stage, self.mesh, self.rules, self.config.model.dtype)

    def seed(self, iteration: int, salt: int) -> int:
        return stages.stage_seed(self.config.seed, iteration, salt)


# -- the loop --------------------------------------------------------------------------------------

def run(config, workdir: str, config_path: str = "") -> dict:
    config_check.check(config)  # also for callers of the API; python -m dpost.main checked it already
    r = setup(config, workdir, config_path)
    entries = []

    sft_model, entry = train_sft(r, iteration=0, examples=_gold(r))  # warm-up: SFT_0
    entries.append(entry)
    pair_rounds, label_rounds = [], []
    iterations = 0 if config.method == "sft" else config.iterations
    for k in range(1, iterations + 1):
        if config.method == "dpo_st":
            samples, sample_manifest = sample(r, sft_model, k, "sample_pairs", config.sampling.pairs)
            pair_rounds.append(samples)
            pairs, pairs_manifest = preference_pairs(r, k, pair_rounds)
            labeler, entry = train_dpo(r, k, sft_model, pairs, [sample_manifest, pairs_manifest])
            entry["sampled"] = sampled(sample_manifest, f"sft_{k - 1}")
            entries.append(entry)
            labeler_name = f"dpo_{k}"
        else:  # st: plain self-training labels with the previous SFT model
            labeler, labeler_name = sft_model, f"sft_{k - 1}"
        samples, labels_sample_manifest = sample(r, labeler, k, "sample_labels", config.sampling.labels)
        label_rounds.append(samples)
        labels, labels_manifest = pseudo_labels(r, k, label_rounds)
        sft_model, entry = train_sft(r, k, labels, [labels_sample_manifest, labels_manifest])
        entry["sampled"] = sampled(labels_sample_manifest, labeler_name)
        entry["pseudo_labels"], entry["beyond_gold"] = labels_manifest["pseudo_labels"], labels_manifest["beyond_gold"]
        entries.append(entry)

    # Every process builds the same document; process 0 writes it.
    results = reports.results_document(config_path, config.method, config.seed, entries, pretrain=r.pretrain)
    if jax.process_index() == 0:
        reports.write_json(r.rundir.root / "results.json", results)
        split = "test" if "test" in r.task.eval_sets else next(iter(r.task.eval_sets), "test")
        reports.write_run_reports(r.rundir.root, results, split)
    return results


# -- stages ----------------------------------------------------------------------------------------

def train_sft(r: Run, iteration: int, examples, inputs: list[dict] | None = None):
    stage = r.stage(iteration, "sft")
    if stage.done():
        model = r.load(stage)
        manifest = stage.manifest()
    else:
        model, manifest = stages.sft_stage(r.base, examples, r.config, stage, seed=r.seed(iteration, 1),
                                           mesh=r.mesh, rules=r.rules)
    entry = _entry(iteration, "sft", f"sft_{iteration}", [manifest] + (inputs or []))
    entry["eval"] = evaluate_stage(r, iteration, f"sft_{iteration}", model)
    return model, entry


def train_dpo(r: Run, iteration: int, policy: ModelBundle, pairs: list[dict], inputs: list[dict]):
    stage = r.stage(iteration, "dpo")
    if stage.done():
        model, manifest = r.load(stage), stage.manifest()
    else:
        model, manifest = stages.dpo_stage(policy, pairs, r.config, stage, seed=r.seed(iteration, 2),
                                           mesh=r.mesh, rules=r.rules)
    entry = _entry(iteration, "dpo", f"dpo_{iteration}", [manifest] + inputs)
    entry["pairs"] = manifest["pairs"]
    entry["dpo_eval"] = manifest.get("eval", {})
    entry["eval"] = evaluate_stage(r, iteration, f"dpo_{iteration}", model) if r.config.eval.every_stage else {}
    return model, entry


def sample(r: Run, model: ModelBundle, iteration: int, name: str, scfg):
    stage = r.stage(iteration, name)
    if stage.done():
        manifest = stage.manifest()
    else:  # (its return value: on other hosts than 0 the manifest file may not be written yet)
        manifest = stages.sample_stage(model, r.task.train, scfg, stage,
                                       seed=r.seed(iteration, 3 if name == "sample_pairs" else 4),
                                       mesh=r.mesh, rules=r.rules, progress=r.config.progress)
    return stages.read_samples(stage), manifest


def preference_pairs(r: Run, iteration: int, rounds):
    stage = r.stage(iteration, "pairs")
    if not stage.done():
        manifest = stages.pairs_stage(r.task.train, rounds, rounds[-1], r.family, r.config, stage, r.base.tokenizer)
        if manifest["pairs"] == 0:
            raise ValueError(
                f"iteration {iteration}: no preference pairs (no training question has an incorrect sample "
                f"among {manifest['questions']}); DPO would train on nothing. Raise sampling temperature or use method=st."
            )
    stages.barrier(f"pairs {iteration}")
    return stages.read_jsonl(stage.path / "pairs.jsonl"), stage.manifest()


def pseudo_labels(r: Run, iteration: int, rounds):
    stage = r.stage(iteration, "pseudo_labels")
    if not stage.done():
        stages.labels_stage(r.task.train, rounds, r.family, r.config, stage, r.base.tokenizer)
    stages.barrier(f"labels {iteration}")
    rows = stages.read_jsonl(stage.path / "labels.jsonl")
    examples = [(formatting.format_prompt(r.family, row["question"]), row["target"]) for row in rows]
    return examples, stage.manifest()


def evaluate_stage(r: Run, iteration: int, model_name: str, model: ModelBundle) -> dict:
    stage = r.stage(iteration, f"eval_{model_name.split('_')[0]}")
    if stage.done():
        return stage.manifest()["eval"]
    stage.start()
    cfg = r.config
    # Multi-host: every host evaluates on its own devices (outputs of the global mesh are not
    # fetchable by one host); the results are the same on every host, process 0 writes them.
    mesh = stages.sampling_mesh(r.mesh)
    model = stages.bundle_on(model, mesh, r.rules)
    results = evaluation.evaluate(
        model, r.task.eval_sets, cfg.sampling.eval, prompt_fn=lambda q: stages.prompt_ids(model, q), mesh=mesh,
        progress=cfg.progress, out_dir=stage.path, pass_at_k=cfg.eval.pass_at_k,
        pass_at_k_temperature=cfg.eval.pass_at_k_temperature, seed=r.seed(iteration, 5),
    )
    stage.finish(model=model_name, eval=results)
    log.info("%s: %s", model_name, json.dumps(results))
    return results


def sampled(manifest: dict, model: str) -> dict:
    """What a sampling stage says of its model's samples on the training questions (pass@1,
    pass@n, questions with a correct sample): the paper's mechanism is DPO raising these."""
    keys = ("num_samples", "questions", "pass_at_1", "pass_at_n", "questions_with_correct")
    return dict(model=model, **{k: manifest[k] for k in keys if k in manifest})


def _entry(iteration: int, stage: str, model: str, manifests: list[dict]) -> dict:
    return {
        "iteration": iteration, "stage": stage, "model": model,
        "seconds": round(sum(m.get("seconds", 0.0) for m in manifests if m), 3),
        "flops": float(sum(m.get("flops", 0.0) for m in manifests if m)),
    }


def _gold(r: Run):
    return stages.gold_labels(r.task.train, r.family)


# -- set-up ----------------------------------------------------------------------------------------

def setup(config, workdir: str, config_path: str) -> Run:
    rundir = RunDir(workdir, config, config_path)
    rundir.guard_config()
    mesh = sharding.make_mesh(dict(config.mesh))
    rules = sharding.rules_from_config(config.sharding.rules)
    memory_plan = plan.plan(config, dict(mesh.shape), None)
    plan.check_fits(memory_plan)  # refuse, with the numbers, a run that cannot fit in device memory
    task = load_task(config, workdir)
    base, pretrain_info = load_base_model(config, task, mesh, rules)
    log.info("run %s: %s, %d train questions (%d labeled), eval sets %s, mesh %s", workdir, base.source,
             len(task.train), sum(1 for ex in task.train if ex.answer),
             {k: len(v) for k, v in task.eval_sets.items()}, dict(mesh.shape))
    return Run(config, rundir, task, base, mesh, rules, pretrain_info)


def load_base_model(config, task: Task, mesh, rules) -> tuple[ModelBundle, dict | None]:
    """M0 and, for source=pretrain, its pre-training record: a pre-trained checkpoint, the
    synthetic pre-training (cached), or (source=scratch) a random init with the task's tokenizer."""
    source = config.model.source
    if source == "pretrain":
        bundle, info = pretrain.pretrained_m0(config, mesh, rules)
        return with_model_options(bundle, config), info
    if source == "scratch":
        from dpost.data import synthetic

        if task.tokenizer_dir is None:
            raise ValueError("config field 'model.source' = scratch needs data.source = synthetic (its tokenizer)")
        tokenizer = synthetic.load_tokenizer(task.tokenizer_dir)
        model_config = pretrain.scratch_model_config(config, tokenizer)
        return models.init_random(config.model.family, model_config, tokenizer, seed=config.seed, mesh=mesh,
                                  rules=rules), None
    bundle = models.load(source, dtype=config.model.dtype, mesh=mesh, rules=rules)
    if config.model.family and bundle.family != config.model.family:
        raise ValueError(f"config field 'model.family' is {config.model.family!r} but {source} is a {bundle.family} model")
    if bundle.tokenizer is None:
        raise ValueError(f"{source}: no tokenizer found beside the weights")
    return with_model_options(bundle, config), None


def with_model_options(bundle, config):
    """The bundle with the run's `model.remat` and `model.attention` (a checkpoint carries its own)."""
    options = {"remat": bool(config.model.remat), "attention": config.model.attention}
    if all(getattr(bundle.config, k) == v for k, v in options.items()):
        return bundle
    model_config = dataclasses.replace(bundle.config, **options)
    return bundle.replace(config=model_config, module=models.get_family(bundle.family).make_module(model_config))


def evaluate_checkpoint(config, workdir: str, config_path: str = "") -> dict:
    """mode=eval: evaluates `eval.checkpoint` (orbax:/hf:/gguf:) alone; writes WORKDIR/eval.json."""
    config_check.check(config)
    source = config.eval.checkpoint
    mesh = sharding.make_mesh(dict(config.mesh))
    rules = sharding.rules_from_config(config.sharding.rules)
    task = load_task(config, workdir)
    model = models.load(source, dtype=config.model.dtype, mesh=mesh, rules=rules)
    if model.tokenizer is None:
        raise ValueError(f"{source}: no tokenizer found beside the weights")
    mesh = stages.sampling_mesh(mesh)  # multi-host: each host evaluates on its own devices
    model = stages.bundle_on(model, mesh, rules)
    out = absolute(workdir)
    results = evaluation.evaluate(
        model, task.eval_sets, config.sampling.eval, prompt_fn=lambda q: stages.prompt_ids(model, q), mesh=mesh,
        progress=config.progress, out_dir=out, pass_at_k=config.eval.pass_at_k,
        pass_at_k_temperature=config.eval.pass_at_k_temperature, seed=config.seed,
    )
    entry = {"iteration": 0, "stage": "eval", "model": source, "eval": results, "seconds": 0.0, "flops": 0.0}
    doc = {"config": config_path, "method": "eval", "seed": config.seed, "stages": [entry],
           "final": {"model": source, "eval": results}}
    if jax.process_index() == 0:
        reports.write_json(out / "eval.json", doc)
    return doc
