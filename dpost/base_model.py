"""M0, the model every SFT_k restarts from, as `config.model.source` names it.

    hf:<dir or hub id> | gguf:<file> | orbax:<dir>   a saved checkpoint (`dpost.models.load`)
    pretrain                                          the tiny synthetic pre-training (`dpost.pretrain`, cached)
    scratch                                           a random init with the synthetic task's tokenizer
"""

from __future__ import annotations

import dataclasses

from dpost import models, pretrain
from dpost.sharding import Layout
from dpost.data.task import Task
from dpost.models import layers
from dpost.models.bundle import ModelBundle


def load(config, task: Task, layout: Layout) -> tuple[ModelBundle, dict | None]:
    """M0 laid out by `layout` and, for source=pretrain, its pre-training record (time, FLOPs, cache)."""
    source = config.model.source
    if source == "pretrain":
        bundle, info = pretrain.pretrained_m0(config, layout)
        return with_model_options(bundle, config), info
    if source == "scratch":
        return _scratch(config, task, layout), None
    bundle = models.load(source, dtype=config.model.dtype, layout=layout)
    if config.model.family and bundle.family != config.model.family:
        raise ValueError(f"config field 'model.family' is {config.model.family!r} but {source} is a {bundle.family} model")
    if bundle.tokenizer is None:
        raise ValueError(f"{source}: no tokenizer found beside the weights")
    return with_model_options(bundle, config), None


def with_model_options(bundle: ModelBundle, config) -> ModelBundle:
    """The bundle with the run's `model.remat`, `model.scan_layers` and `model.attention` (a
    checkpoint carries its own)."""
    options = {"remat": layers.remat_name(config.model.remat), "scan_layers": bool(config.model.scan_layers),
               "attention": config.model.attention}
    if all(getattr(bundle.config, k) == v for k, v in options.items()):
        return bundle
    model_config = dataclasses.replace(bundle.config, **options)
    return bundle.replace(config=model_config, module=models.get_family(bundle.family).make_module(model_config))


def _scratch(config, task: Task, layout: Layout) -> ModelBundle:
    from dpost.data import synthetic

    if task.tokenizer_dir is None:
        raise ValueError("config field 'model.source' = scratch needs data.source = synthetic (its tokenizer)")
    tokenizer = synthetic.load_tokenizer(task.tokenizer_dir)
    model_config = pretrain.scratch_model_config(config, tokenizer)
    return models.init_random(config.model.family, model_config, tokenizer, seed=config.seed, layout=layout)
