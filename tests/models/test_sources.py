"""Error cases of `models.load`: each names the source and, where relevant, the tensor."""

from __future__ import annotations

import json

import numpy as np
import pytest
import transformers
from safetensors.numpy import save_file

from dpost import models


def test_unknown_scheme():
    with pytest.raises(ValueError, match="'pt:foo'.*hf:.*gguf:.*orbax:"):
        models.load("pt:foo")


@pytest.mark.parametrize("source", ["hf:/nonexistent/dir", "gguf:/nonexistent/x.gguf", "orbax:/nonexistent/ckpt"])
def test_missing_path(source):
    with pytest.raises(ValueError, match=source.replace("/", ".")):
        models.load(source)


def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    with pytest.raises(ValueError, match="unsupported architecture.*GPT2LMHeadModel"):
        models.load(f"hf:{tmp_path}")


def _tiny_llama_dir(tmp_path):
    cfg = transformers.LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    return tmp_path


def test_tensor_shape_mismatch_names_tensor(tmp_path):
    folder = _tiny_llama_dir(tmp_path)
    from safetensors.numpy import load_file

    tensors = load_file(str(folder / "model.safetensors"))
    tensors["model.layers.0.mlp.up_proj.weight"] = np.zeros((31, 16), np.float32)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.up_proj\.weight.*\(31, 16\)"):
        models.load(f"hf:{folder}")


def test_missing_tensor_names_tensor(tmp_path):
    folder = _tiny_llama_dir(tmp_path)
    from safetensors.numpy import load_file

    tensors = load_file(str(folder / "model.safetensors"))
    del tensors["model.norm.weight"]
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing tensor 'model\.norm\.weight'"):
        models.load(f"hf:{folder}")


def test_pytorch_pickles_are_refused_not_unpickled(tmp_path):
    """A folder with only `.bin` weights gets the conversion to run; the pickle is never opened
    (its bytes here are not a valid pickle, so opening it would fail differently)."""
    folder = _tiny_llama_dir(tmp_path)
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match=r"only PyTorch \.bin weights found; dpost reads safetensors.*save_pretrained"):
        models.load(f"hf:{folder}")
