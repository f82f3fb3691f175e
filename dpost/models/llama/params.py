"""Llama weights: transformers (HF) and llama.cpp (GGUF) names and layouts <-> dpost's param tree."""

from __future__ import annotations

import numpy as np

from dpost.models.convert import TensorRule
from dpost.models.llama.model import LlamaConfig


def config_from_hf(hf: dict) -> LlamaConfig:
    """LlamaConfig from a transformers `config.json` dict (LlamaForCausalLM)."""
    heads = hf["num_attention_heads"]
    rope_scaling = hf.get("rope_scaling")
    rope_theta = hf.get("rope_theta", 10000.0)
    if isinstance(rope_scaling, dict):
        rope_theta = rope_scaling.get("rope_theta", rope_theta)
        kind = rope_scaling.get("rope_type", rope_scaling.get("type", "default"))
        if kind == "default":
            rope_scaling = None
        elif kind != "llama3":
            raise ValueError(f"unsupported rope_scaling type {kind!r} (supported: default, llama3)")
    rope_params = hf.get("rope_parameters")  # transformers >= 5 keeps rope settings here
    if isinstance(rope_params, dict):
        rope_theta = rope_params.get("rope_theta", rope_theta)
        if rope_params.get("rope_type", "default") == "llama3":
            rope_scaling = dict(rope_params)
    if rope_scaling:
        rope_scaling = {
            k: rope_scaling[k]
            for k in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        }
    eos = hf.get("eos_token_id", 2)
    if isinstance(eos, list):
        eos = eos[0]
    return LlamaConfig(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        rope_theta=float(rope_theta),
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        max_position_embeddings=hf.get("max_position_embeddings", 4096),
        rope_scaling=rope_scaling,
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=eos,
        pad_token_id=hf.get("pad_token_id"),
    )


def config_to_hf(cfg: LlamaConfig) -> dict:
    out = dict(
        architectures=["LlamaForCausalLM"],
        model_type="llama",
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim,
        rope_theta=cfg.rope_theta,
        rms_norm_eps=cfg.rms_norm_eps,
        tie_word_embeddings=cfg.tie_word_embeddings,
        max_position_embeddings=cfg.max_position_embeddings,
        hidden_act="silu",
        attention_bias=False,
        mlp_bias=False,
        bos_token_id=cfg.bos_token_id,
        eos_token_id=cfg.eos_token_id,
        pad_token_id=cfg.pad_token_id,
        torch_dtype="float32",
    )
    if cfg.rope_scaling:
        out["rope_scaling"] = dict(dict(cfg.rope_scaling), rope_type="llama3", rope_theta=cfg.rope_theta)
    return out


def hf_rules(cfg: LlamaConfig) -> list[TensorRule]:
    """One rule per dpost parameter; `{layer}` names are stacked along the scanned `layers` axis."""
    d, h, kv, hd = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim

    def proj_in(n):  # HF [n*hd, d] -> dpost [d, n, hd]
        return (lambda w: w.T.reshape(d, n, hd)), (lambda p: p.reshape(d, n * hd).T)

    layer = "model.layers.{layer}."
    rules = [
        TensorRule(("embed",), "model.embed_tokens.weight"),
        TensorRule(("final_norm", "scale"), "model.norm.weight"),
        TensorRule(("layers", "attn_norm", "scale"), layer + "input_layernorm.weight", stacked=True),
        TensorRule(("layers", "mlp_norm", "scale"), layer + "post_attention_layernorm.weight", stacked=True),
        TensorRule(("layers", "attn", "q"), layer + "self_attn.q_proj.weight", *proj_in(h), stacked=True),
        TensorRule(("layers", "attn", "k"), layer + "self_attn.k_proj.weight", *proj_in(kv), stacked=True),
        TensorRule(("layers", "attn", "v"), layer + "self_attn.v_proj.weight", *proj_in(kv), stacked=True),
        TensorRule(
            ("layers", "attn", "o"), layer + "self_attn.o_proj.weight",
            lambda w: w.T.reshape(h, hd, d), lambda p: p.reshape(h * hd, d).T, stacked=True,
        ),
        TensorRule(("layers", "mlp", "gate"), layer + "mlp.gate_proj.weight", np.transpose, np.transpose, stacked=True),
        TensorRule(("layers", "mlp", "up"), layer + "mlp.up_proj.weight", np.transpose, np.transpose, stacked=True),
        TensorRule(("layers", "mlp", "down"), layer + "mlp.down_proj.weight", np.transpose, np.transpose, stacked=True),
    ]
    if not cfg.tie_word_embeddings:
        rules.append(TensorRule(("lm_head",), "lm_head.weight", np.transpose, np.transpose))
    return rules


# llama.cpp tensor names -> transformers names (GGUF stores [out, in] like HF once read by numpy).
GGUF_TO_HF = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}


def gguf_name_to_hf(name: str) -> str | None:
    if name in GGUF_TO_HF:
        return GGUF_TO_HF[name]
    parts = name.split(".", 2)
    if parts[0] == "blk" and len(parts) == 3 and parts[2] in GGUF_TO_HF:
        return f"model.layers.{parts[1]}.{GGUF_TO_HF[parts[2]]}"
    return None


def unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's interleaved-rotary row order for q/k projections (back to HF half-split)."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def config_from_gguf(meta: dict) -> LlamaConfig:
    """LlamaConfig from GGUF metadata (keys `llama.*`, `tokenizer.ggml.*`)."""
    heads = int(meta["llama.attention.head_count"])
    hidden = int(meta["llama.embedding_length"])
    vocab = meta.get("llama.vocab_size") or len(meta["tokenizer.ggml.tokens"])
    return LlamaConfig(
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(meta["llama.feed_forward_length"]),
        num_layers=int(meta["llama.block_count"]),
        num_heads=heads,
        num_kv_heads=int(meta.get("llama.attention.head_count_kv", heads)),
        head_dim=int(meta.get("llama.attention.key_length", hidden // heads)),
        rope_theta=float(meta.get("llama.rope.freq_base", 10000.0)),
        rms_norm_eps=float(meta.get("llama.attention.layer_norm_rms_epsilon", 1e-5)),
        tie_word_embeddings=not meta.get("_has_output_weight", False),
        max_position_embeddings=int(meta.get("llama.context_length", 4096)),
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
        pad_token_id=meta.get("tokenizer.ggml.padding_token_id"),
    )
