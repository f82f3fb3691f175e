"""M0 for synthetic tasks: a tiny model pre-trained once on a broad synthetic corpus (`model.source=pretrain`).

The protocol restarts every SFT_k from a *pre-trained* M0 (Flan-T5, Llama-2). A random init makes
each SFT_k a from-scratch training whose outcome swings by more than any method effect, so the CPU
default pre-trains its tiny model first: `config.pretrain.corpus` problems (the synthetic generator
with other names than the task's, so no corpus question is a task question), a byte-level BPE
tokenizer trained on them, and SFT-style training from a random init (`config.pretrain`'s own
seed, steps and optimizer: the run's seed does not enter, so every method and seed of a comparison
fine-tunes the same M0).

The result is cached under `pretrain.cache_dir` (default $DPOST_CACHE_DIR, else ~/.cache/dpost) in a
folder named by the hash of its content: the corpus text, the model's fields and the training
fields (not the execution options `model.remat` and `model.scan_layers`: M0 is always pre-trained
with their defaults, and the run's apply to its stages). A second run reuses it; a changed field or
generator builds a new one. Its time and FLOPs are reported apart from the run's stages
(results.json "pretrain").
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging

import jax
from etils import epath

from dpost import models, workdir
from dpost.data import synthetic
from dpost.models.bundle import ModelBundle
from dpost.sharding import Layout
from dpost.workdir import StageDir, flatten_config

log = logging.getLogger(__name__)

STAGE = "pretrain"


def cache_root(config) -> epath.Path:
    return workdir.cache_root(config.pretrain.cache_dir)


def corpus(config) -> list:
    fields = dict(config.pretrain.corpus)
    n, seed = fields.pop("n"), fields.pop("seed")
    return synthetic.make_corpus(seed, n, synthetic.difficulty_from_fields(fields, "pretrain.corpus"))


def content_hash(config, examples) -> str:
    """Hash of what M0 depends on: the corpus text, the model fields and the training fields."""
    h = hashlib.sha256()
    for ex in examples:
        h.update(f"{ex.question}\x1f{ex.answer}\x1e".encode())
    keyed = workdir.keyed_fields(flatten_config(config))  # fields added later are keyed only off their defaults
    training = {k.removeprefix("pretrain."): v for k, v in keyed.items()
                if k.startswith("pretrain.") and not k.startswith(("pretrain.cache_dir", "pretrain.corpus"))}
    fields = {"family": config.model.family, "dtype": config.model.dtype,
              "scratch": flatten_config(config.model.scratch), "training": training}
    if config.model.attention != "einsum":  # keyed only off the default, so existing caches keep their key
        fields["attention"] = config.model.attention
    h.update(json.dumps(fields, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def training_config(config):
    """The run's config with `sft` replaced by the pre-training fields (sft_stage reads `sft`)."""
    p = config.pretrain
    cfg = config.copy_and_resolve_references()
    cfg.unlock()
    cfg.sft.epochs, cfg.sft.max_steps, cfg.sft.batch_size = p.epochs, p.max_steps, p.batch_size
    cfg.sft.grad_accum = 1
    cfg.sft.optimizer = p.optimizer
    cfg.checkpoint.every_steps = p.checkpoint_every
    return cfg


@contextlib.contextmanager
def _lock(path: epath.Path):
    """One builder per cache entry on this machine (concurrent `--seeds` processes wait for it).
    Multi-host runs build collectively (SPMD), so they take no host-local lock."""
    if jax.process_count() > 1:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(str(path), "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def pretrained_m0(config, layout: Layout = Layout()) -> tuple[ModelBundle, dict]:
    """M0 and its pre-training manifest (seconds, FLOPs, steps, `cache` folder, `reused`)."""
    from dpost import stages  # stages imports the model and training stacks; keep this module light

    examples = corpus(config)
    key = content_hash(config, examples)
    root = cache_root(config) / key
    stage = StageDir(root / STAGE, key)

    def build():
        log.info("pre-training M0 on %d synthetic problems into %s", len(examples), root)
        tokenizer = synthetic.train_tokenizer(synthetic.tokenizer_corpus(examples), str(root / "tokenizer"),
                                              int(config.model.scratch.get("tokenizer_vocab_size", 512)))
        # Pre-trained with the default execution options whatever the run's (`model.remat`,
        # `model.scan_layers`, applied to M0 afterwards): they change XLA's rounding, not the math,
        # so keeping them out of M0 lets one cached M0 (keyed without them) serve every run.
        model_config = dataclasses.replace(scratch_model_config(config, tokenizer), remat="none", scan_layers=True)
        base = models.init_random(config.model.family, model_config, tokenizer, seed=config.pretrain.seed,
                                  layout=layout)
        return stages.sft_stage(base, stages.gold_labels(examples, config.model.family), training_config(config),
                                stage, seed=config.pretrain.seed, layout=layout)

    reused = stage.done()
    if not reused:
        with _lock(root.parent / f".{key}.lock"):
            reused = stage.done()  # another process may have built it while this one waited
            stage.cached(build, load=lambda done: None)
    # Loaded back also when just built: M0 is the same model whether built now or reused.
    bundle = stages.load_stage_model(stage, layout, config.model.dtype)
    manifest = stage.manifest()
    info = {k: manifest[k] for k in ("seconds", "flops", "steps", "examples", "final_loss") if k in manifest}
    return bundle, dict(info, cache=str(root), reused=reused)


def scratch_model_config(config, tokenizer):
    """The family config of `model.scratch` for `tokenizer` (vocabulary size and special ids)."""
    family = models.get_family(config.model.family)
    fields = {k: v for k, v in dict(config.model.scratch).items() if k != "tokenizer_vocab_size"}
    return family.config_class()(
        vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, dtype=config.model.dtype, remat=config.model.remat,
        scan_layers=config.model.scan_layers, attention=config.model.attention, **fields,
    )
