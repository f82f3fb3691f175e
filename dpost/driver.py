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
    SFT_K again with other seeds, if eval.final_replicates > 1     # the final accuracy: their mean

`method=st` drops the DPO step (pseudo-labels come from SFT_{k-1}); `method=sft` stops after the
warm-up. Each stage is one call into `dpost.stages`, run through `StageDir.cached` in
WORKDIR/iter_<k>/<stage>/: a finished stage's result is read back, any other runs (or resumes).
Each returns (result, manifest); `dpost.reports` turns the manifests into results.json's entries.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import logging
from typing import Any, NamedTuple

import jax

from dpost import base_model, compile_cache, config_check, evaluation, memory, reports, sharding, stages
from dpost.data import formatting
from dpost.data.task import Task, load_task
from dpost.models.bundle import ModelBundle
from dpost.workdir import RunDir, StageDir

log = logging.getLogger(__name__)


class Salt(enum.IntEnum):
    """A stage's seed is `stages.stage_seed(config.seed, iteration, salt)`. The values are part of
    every run's results: changing one changes them."""

    SFT = 1
    DPO = 2
    SAMPLE_PAIRS = 3
    SAMPLE_LABELS = 4
    EVAL = 5


class Sampling(NamedTuple):
    """One of an iteration's two sampling stages."""

    stage: str  # its folder: iter_<k>/<stage>
    config_field: str  # its settings: config.sampling.<config_field>
    salt: Salt


PAIR_SAMPLING = Sampling("sample_pairs", "pairs", Salt.SAMPLE_PAIRS)
LABEL_SAMPLING = Sampling("sample_labels", "labels", Salt.SAMPLE_LABELS)


@dataclasses.dataclass
class Run:
    """What every stage of one run shares."""

    config: Any
    rundir: RunDir
    task: Task
    base: ModelBundle  # M0: every SFT_k restarts from it
    layout: sharding.Layout  # mesh + logical-axis rules, made once from config.mesh and config.sharding.rules
    pretrain: dict | None = None  # model.source=pretrain: M0's pre-training (time, FLOPs, cache)

    @property
    def family(self) -> str:
        return self.base.family

    def stage(self, iteration: int, name: str) -> StageDir:
        return self.rundir.stage(iteration, name)

    def load(self, stage: StageDir) -> ModelBundle:
        return stages.load_stage_model(stage, self.layout, self.config.model.dtype)

    def seed(self, iteration: int, salt: Salt, replicate: int = 0) -> int:
        """Replicate j > 0 of a stage (`eval.final_replicates`) salts its seed once more, by j."""
        return stages.stage_seed(self.config.seed, iteration, salt, *([replicate] if replicate else []))


# -- the loop --------------------------------------------------------------------------------------

def run(config, workdir: str, config_path: str = "") -> dict:
    """Runs (or resumes) `config.method` in `workdir`; returns results.json's document, the same on
    every process (process 0 writes it, with report.md and accuracy.png)."""
    config_check.check(config)  # also for callers of the API; python -m dpost.main checked it already
    compile_cache.enable(config)
    r = setup(config, workdir, config_path)
    examples = stages.gold_labels(r.task.train, r.family)
    sft, trained = train_sft(r, 0, examples)  # warm-up: SFT_0
    entries = [reports.sft_entry(0, trained, evaluate(r, 0, "sft", sft))]
    pair_rounds, label_rounds = [], []  # each round's samples per question, pooled by the builders
    iterations = 0 if config.method == "sft" else config.iterations
    for k in range(1, iterations + 1):
        if config.method == "dpo_st":
            samples, sampled = sample(r, k, PAIR_SAMPLING, sft)
            pair_rounds.append(samples)
            pairs, built = preference_pairs(r, k, pair_rounds)
            dpo, trained = train_dpo(r, k, sft, pairs)
            dpo_eval = evaluate(r, k, "dpo", dpo) if config.eval.every_stage else {}
            entries.append(reports.dpo_entry(k, trained, dpo_eval, samples=sampled, pairs=built))
            labeler, labeler_name = dpo, reports.model_name("dpo", k)
        else:  # st: plain self-training, pseudo-labels sampled from the previous SFT model
            labeler, labeler_name = sft, reports.model_name("sft", k - 1)
        samples, sampled = sample(r, k, LABEL_SAMPLING, labeler)
        label_rounds.append(samples)
        examples, built = pseudo_labels(r, k, label_rounds)
        sft, trained = train_sft(r, k, examples)
        entries.append(reports.sft_entry(k, trained, evaluate(r, k, "sft", sft), samples=sampled,
                                         sampled_by=labeler_name, labels=built))
    replicates = [replicate_sft(r, iterations, examples, j) for j in range(1, config.eval.final_replicates)]
    return write_results(r, entries, replicates)


# -- stages: each returns (its result, its manifest) -----------------------------------------------

def train_sft(r: Run, iteration: int, examples: list[tuple[str, str]], replicate: int = 0) -> tuple[ModelBundle, dict]:
    stage = r.stage(iteration, "sft" + reports.replicate_suffix(replicate))
    seed = r.seed(iteration, Salt.SFT, replicate)
    return stage.cached(lambda: stages.sft_stage(r.base, examples, r.config, stage, seed=seed, layout=r.layout),
                        load=r.load)


def replicate_sft(r: Run, iteration: int, examples: list[tuple[str, str]], replicate: int) -> dict:
    """The last SFT stage trained again on its data with the replicate's seed, and evaluated: its
    entry in results.json's `final.replicates`."""
    model, trained = train_sft(r, iteration, examples, replicate)
    return reports.replicate_entry(reports.model_name("sft", iteration, replicate), trained,
                                   evaluate(r, iteration, "sft", model, replicate))


def train_dpo(r: Run, iteration: int, policy: ModelBundle, pairs: list[dict]) -> tuple[ModelBundle, dict]:
    stage = r.stage(iteration, "dpo")
    return stage.cached(lambda: stages.dpo_stage(policy, pairs, r.config, stage, seed=r.seed(iteration, Salt.DPO),
                                                 layout=r.layout), load=r.load)


def sample(r: Run, iteration: int, sampling: Sampling, model: ModelBundle) -> tuple[dict[str, list[dict]], dict]:
    """`model`'s samples per training question id, and the stage's manifest (pass rates)."""
    stage = r.stage(iteration, sampling.stage)
    scfg = r.config.sampling[sampling.config_field]
    return stage.cached(lambda: stages.sample_stage(model, r.task.train, scfg, stage,
                                                    seed=r.seed(iteration, sampling.salt), layout=r.layout,
                                                    progress=r.config.progress),
                        load=stages.read_samples)


def preference_pairs(r: Run, iteration: int, rounds: list[dict]) -> tuple[list[dict], dict]:
    stage = r.stage(iteration, "pairs")
    pairs, manifest = stage.cached(lambda: stages.pairs_stage(r.task.train, rounds, rounds[-1], r.family, r.config,
                                                              stage, r.base.tokenizer), load=stages.read_pairs)
    if not pairs:
        raise ValueError(
            f"iteration {iteration}: no preference pairs (no training question has an incorrect sample "
            f"among {manifest['questions']}); DPO would train on nothing. Raise sampling temperature or use method=st."
        )
    return pairs, manifest


def pseudo_labels(r: Run, iteration: int, rounds: list[dict]) -> tuple[list[tuple[str, str]], dict]:
    """The pseudo-labels as SFT examples (prompt text, target text), and the stage's manifest."""
    stage = r.stage(iteration, "pseudo_labels")
    rows, manifest = stage.cached(lambda: stages.labels_stage(r.task.train, rounds, r.family, r.config, stage,
                                                              r.base.tokenizer), load=stages.read_labels)
    return [(formatting.format_prompt(r.family, row["question"]), row["target"]) for row in rows], manifest


def evaluate(r: Run, iteration: int, trained_by: str, model: ModelBundle, replicate: int = 0) -> dict:
    """The evaluation of the model that stage `trained_by` ("sft" | "dpo") made in `iteration`."""
    name = reports.model_name(trained_by, iteration, replicate)
    stage = r.stage(iteration, f"eval_{trained_by}" + reports.replicate_suffix(replicate))

    def run_evaluation():
        results = evaluation.evaluate_with_config(model, r.task.eval_sets, r.config, layout=r.layout,
                                                  out_dir=stage.path, seed=r.seed(iteration, Salt.EVAL))
        log.info("%s: %s", name, json.dumps(results))
        return None, dict(model=name, eval=results)  # the results live in the manifest

    _, manifest = stage.cached(run_evaluation, load=lambda done: None)
    return manifest["eval"]


def write_results(r: Run, entries: list[dict], replicates: list[dict]) -> dict:
    # Every process builds the same document (from manifests read back from the workdir); process 0 writes it.
    results = reports.results_document(r.rundir.config_path, r.config.method, r.config.seed, entries,
                                       pretrain=r.pretrain, replicates=replicates)
    if jax.process_index() == 0:
        reports.write_json(r.rundir.root / "results.json", results)
        split = "test" if "test" in r.task.eval_sets else next(iter(r.task.eval_sets), "test")
        reports.write_run_reports(r.rundir.root, results, split)
    return results


# -- set-up ----------------------------------------------------------------------------------------

def setup(config, workdir: str, config_path: str) -> Run:
    rundir = RunDir(workdir, config, config_path)
    rundir.guard_config()
    layout = sharding.Layout.from_config(config)
    memory.check_run(config, layout)
    task = load_task(config, workdir)
    base, pretrain_info = base_model.load(config, task, layout)
    log.info("run %s: %s, %d train questions (%d labeled), eval sets %s, mesh %s", workdir, base.source,
             len(task.train), sum(1 for ex in task.train if ex.answer),
             {k: len(v) for k, v in task.eval_sets.items()}, dict(layout.mesh.shape))
    return Run(config, rundir, task, base, layout, pretrain_info)
