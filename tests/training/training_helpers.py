"""Tiny random models and batches shared by the training tests and their child-process scripts.

Importable without pytest (the sharding/resume checks run in subprocesses).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import numpy as np

LLAMA_HF = dict(
    vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False, rms_norm_eps=1e-6,
    pad_token_id=0, bos_token_id=1, eos_token_id=2,
)
T5_HF = dict(
    vocab_size=64, d_model=24, d_kv=8, d_ff=40, num_layers=2, num_decoder_layers=2, num_heads=4,
    relative_attention_num_buckets=8, relative_attention_max_distance=20, feed_forward_proj="gated-gelu",
    tie_word_embeddings=False, decoder_start_token_id=0, dropout_rate=0.0, pad_token_id=0, eos_token_id=1,
)


@functools.lru_cache(maxsize=None)
def hf_llama(seed: int = 0, **overrides):
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(**dict(LLAMA_HF, **overrides))
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # non-trivial norms so that their gradients matter
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
    return model


@functools.lru_cache(maxsize=None)
def hf_t5(seed: int = 0):
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(seed)
    model = transformers.T5ForConditionalGeneration(transformers.T5Config(**T5_HF)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif "relative_attention_bias" in name:
                p.copy_(torch.randn_like(p))
        # transformers 5 ties lm_head in memory: untie it
        model.lm_head.weight = torch.nn.Parameter(0.3 * torch.randn_like(model.shared.weight))
    return model


def family_modules(family: str):
    if family == "llama":
        from dpost.models.llama import model as m, params as p
    else:
        from dpost.models.t5 import model as m, params as p
    return m, p


def import_hf(family: str, hf_model):
    """(module, config, params, boxed abstract params) for a transformers model."""
    from dpost.models import convert

    from dpost.models.registry import get_family

    m, p = family_modules(family)
    tensors = {k: v.detach().numpy() for k, v in hf_model.state_dict().items()}
    # transformers 5 declares every T5 head tied; the tensors say whether it is (as in models.load)
    cfg = get_family(family).settle_config(p.config_from_hf(hf_model.config.to_dict()), tensors.__getitem__, "test")
    boxed = jax.eval_shape(lambda: m.init_params(cfg, jax.random.key(0)))
    params = convert.import_params(p.hf_rules(cfg), tensors.__getitem__, nn.unbox(boxed), None, cfg.num_layers, "test")
    return m.make_module(cfg), cfg, params, boxed


def export_to_torch_names(family: str, cfg, params) -> dict[str, np.ndarray]:
    from dpost.models import convert

    _, p = family_modules(family)
    return convert.export_tensors(p.hf_rules(cfg), params, cfg.num_layers)


def tiny_llama(seed: int = 0, **overrides):
    """The tiny transformers Llama imported (parity tests against it need torch)."""
    return import_hf("llama", hf_llama(seed, **overrides))


def init_model(family: str, seed: int = 0, **overrides):
    """(module, config, params, boxed abstract params) of a tiny model of LLAMA_HF's / T5_HF's shape
    initialised by dpost alone (no torch: for invariance tests), norms scaled randomly around 1 so
    that their gradients matter."""
    m, p = family_modules(family)
    cfg = p.config_from_hf(dict(LLAMA_HF if family == "llama" else T5_HF, **overrides))
    boxed = jax.eval_shape(lambda: m.init_params(cfg, jax.random.key(0)))
    params = nn.unbox(m.init_params(cfg, jax.random.key(seed)))
    rng = np.random.default_rng(seed)

    def norms_around_one(path, x):
        if "norm" not in jax.tree_util.keystr(path):
            return x
        return jax.numpy.asarray(1.0 + 0.2 * rng.standard_normal(x.shape), x.dtype)

    return m.make_module(cfg), cfg, jax.tree_util.tree_map_with_path(norms_around_one, params), boxed


def random_rows(rng, n: int, length: int, vocab: int, min_len: int = 1, left: bool = False, lens=None):
    ids = np.zeros((n, length), np.int32)
    mask = np.zeros((n, length), np.int32)
    lens = rng.integers(min_len, length + 1, n) if lens is None else np.asarray(lens)
    for i, k in enumerate(lens):
        sl = slice(length - k, length) if left else slice(0, k)
        ids[i, sl] = rng.integers(3, vocab, k)
        mask[i, sl] = 1
    return ids, mask


def sft_batch(seed: int, batch: int = 4, prompt_len: int = 8, completion_len: int = 12, vocab: int = 96):
    rng = np.random.default_rng(seed)
    prompt, prompt_mask = random_rows(rng, batch, prompt_len, vocab, min_len=2, left=True)
    completion, completion_mask = random_rows(rng, batch, completion_len, vocab, min_len=2)
    return {"prompt": prompt, "prompt_mask": prompt_mask, "completion": completion, "completion_mask": completion_mask}


def pair_batch(seed: int, batch: int = 4, prompt_len: int = 8, chosen_len: int = 12, rejected_len: int = 10,
               vocab: int = 96):
    rng = np.random.default_rng(seed)
    prompt, prompt_mask = random_rows(rng, batch, prompt_len, vocab, min_len=2, left=True)
    chosen, chosen_mask = random_rows(rng, batch, chosen_len, vocab, min_len=2)
    rejected, rejected_mask = random_rows(rng, batch, rejected_len, vocab, min_len=2)
    return {"prompt": prompt, "prompt_mask": prompt_mask, "chosen": chosen, "chosen_mask": chosen_mask,
            "rejected": rejected, "rejected_mask": rejected_mask}


def pair_dataset(seed: int, n: int, **kw):
    """A dict of arrays with n pairs (for `pipeline.make_array_loader`)."""
    return pair_batch(seed, batch=n, **kw)


def max_rel_diff(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


# XLA CPU compile time dominates these tests (tiny models): cheaper LLVM passes cut it ~3x.
FAST_COMPILE_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def llama_init_params_for_resume():
    """The initial params of resume_run.py, flattened like its output npz."""
    from flax import traverse_util

    from dpost.models.llama import model as lm
    from dpost.models.llama.model import LlamaConfig

    cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=8)
    params = nn.unbox(lm.init_params(cfg, jax.random.key(1)))
    return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(jax.device_get(params), sep="/").items()}


# ------------------------------------------------------------------------------------------------
# child-process jobs, started in the background at collection time (conftest.py) so that they run
# on the second core while the in-process tests compile; the tests then wait for their results.
# ------------------------------------------------------------------------------------------------
import atexit  # noqa: E402
import concurrent.futures  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
from dpost.faults import KILL_AFTER_STEP as KILL_ENV, SIGTERM_AFTER_STEP as SIGTERM_ENV  # noqa: E402

_EXECUTOR = concurrent.futures.ThreadPoolExecutor(max_workers=1)
_JOBS: dict[str, concurrent.futures.Future] = {}
_TMP = []


def _tmpdir() -> str:
    path = tempfile.mkdtemp(prefix="dpost_training_test_")
    _TMP.append(path)
    return path


@atexit.register
def _cleanup():
    for path in _TMP:
        shutil.rmtree(path, ignore_errors=True)


def child_env(**extra) -> dict:
    env = dict(os.environ)
    env.pop(KILL_ENV, None)
    env.pop(SIGTERM_ENV, None)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env["XLA_FLAGS"] = FAST_COMPILE_FLAGS
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _sharded_job() -> dict:
    env = child_env(XLA_FLAGS="--xla_force_host_platform_device_count=8 " + FAST_COMPILE_FLAGS)
    proc = subprocess.run([sys.executable, os.path.join(HERE, "sharded_check.py")], env=env, capture_output=True,
                          text=True, timeout=900)
    return {"rc": proc.returncode, "stdout": proc.stdout, "stderr": proc.stderr}


def _resume_job() -> dict:
    """Runs resume_run.py: A uninterrupted; B killed after step 3 then resumed; C SIGTERM after
    step 3 then resumed. The children share a compilation cache (same program)."""
    tmp = _tmpdir()
    cache = dict(JAX_COMPILATION_CACHE_DIR=os.path.join(tmp, "jax_cache"), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0,
                 JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES=0)
    runs = []

    def run(name, ckpt, out, workdir=None, **hooks):
        args = [sys.executable, os.path.join(HERE, "resume_run.py"), os.path.join(tmp, ckpt), os.path.join(tmp, out)]
        if workdir:
            args.append(os.path.join(tmp, workdir))
        proc = subprocess.run(args, env=child_env(**cache, **hooks), capture_output=True, text=True, timeout=600)
        runs.append({"name": name, "rc": proc.returncode, "stdout": proc.stdout, "stderr": proc.stderr[-4000:]})

    run("a", "ckpt_a", "a.npz", workdir="work")
    run("b_killed", "ckpt_b", "unused.npz", **{KILL_ENV: 3})
    run("b_resumed", "ckpt_b", "b.npz")
    run("c_sigterm", "ckpt_c", "unused.npz", **{SIGTERM_ENV: 3})
    run("c_resumed", "ckpt_c", "c.npz")
    return {"tmp": tmp, "runs": runs}


JOB_FUNCTIONS = {"sharded": _sharded_job, "resume": _resume_job}


def start_job(name: str) -> None:
    if name not in _JOBS:
        _JOBS[name] = _EXECUTOR.submit(JOB_FUNCTIONS[name])


def job_result(name: str) -> dict:
    start_job(name)
    return _JOBS[name].result()
