"""T5 weights: transformers (HF) names and layouts <-> dpost's param tree.

HF `T5ForConditionalGeneration` state dict (per stack, `{layer}` = block index):

  shared.weight                                                  [V, D]   -> embed
  lm_head.weight                                                 [V, D]   -> lm_head (untied only)
  {stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight    [buckets, H] -> {stack}/relpos
  {stack}.block.{layer}.layer.0.layer_norm.weight / SelfAttention.{q,k,v,o}.weight
  decoder.block.{layer}.layer.1.layer_norm.weight / EncDecAttention.{q,k,v,o}.weight
  {stack}.block.{layer}.layer.{1 | 2}.layer_norm.weight / DenseReluDense.{wi_0,wi_1,wo | wi,wo}.weight
  {stack}.final_layer_norm.weight

`encoder.embed_tokens.weight` / `decoder.embed_tokens.weight`, where a file has them, must equal
`shared.weight` (dpost has one input embedding); they are not written.

The head is two facts (dpost's T5Config has both):
- scaling: transformers 5 writes `scale_decoder_outputs`; transformers 4 wrote only
  `tie_word_embeddings`, which implied the scaling (absent: true, original T5).
- tying: transformers 5 declares every T5 head tied and unties `lm_head` on load exactly when the
  file carries an `lm_head.weight` that differs from `shared.weight` (a v1.1 / Flan-T5 re-saved by
  transformers 5 says `tie_word_embeddings: true` and is untied). So the tensors settle it
  (`settle_config`); config.json alone gives the declared value.
Export writes both keys; a tied-unscaled or untied-scaled head is read correctly by transformers 5
only (transformers 4 cannot express it).
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from dpost.models.convert import TensorRule
from dpost.models.t5.model import T5Config, parse_feed_forward_proj


def config_from_hf(hf: dict) -> T5Config:
    """T5Config from a transformers `config.json` dict (T5ForConditionalGeneration)."""
    eos = hf.get("eos_token_id", 1)
    if isinstance(eos, list):
        eos = eos[0]
    pad = hf.get("pad_token_id", 0)
    start = hf.get("decoder_start_token_id")
    if start is None:
        start = pad if pad is not None else 0
    num_layers = hf.get("num_layers", hf.get("num_hidden_layers"))
    return T5Config(
        vocab_size=hf["vocab_size"],
        d_model=hf["d_model"],
        d_kv=hf["d_kv"],
        d_ff=hf["d_ff"],
        num_layers=num_layers,
        num_heads=hf["num_heads"],
        num_decoder_layers=hf.get("num_decoder_layers") or num_layers,
        relative_attention_num_buckets=hf.get("relative_attention_num_buckets", 32),
        relative_attention_max_distance=hf.get("relative_attention_max_distance", 128),
        layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-6),
        feed_forward_proj=hf.get("feed_forward_proj", "relu"),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
        scale_decoder_outputs=bool(hf.get("scale_decoder_outputs", hf.get("tie_word_embeddings", True))),
        decoder_start_token_id=int(start),
        pad_token_id=pad,
        eos_token_id=eos,
    )


def config_to_hf(cfg: T5Config) -> dict:
    return dict(
        architectures=["T5ForConditionalGeneration"],
        model_type="t5",
        is_encoder_decoder=True,
        vocab_size=cfg.vocab_size,
        d_model=cfg.d_model,
        d_kv=cfg.d_kv,
        d_ff=cfg.d_ff,
        num_layers=cfg.num_layers,
        num_decoder_layers=cfg.num_decoder_layers,
        num_heads=cfg.num_heads,
        relative_attention_num_buckets=cfg.relative_attention_num_buckets,
        relative_attention_max_distance=cfg.relative_attention_max_distance,
        layer_norm_epsilon=cfg.layer_norm_epsilon,
        feed_forward_proj=cfg.feed_forward_proj,
        tie_word_embeddings=cfg.tie_word_embeddings,  # transformers 4 reads this for both facts
        scale_decoder_outputs=cfg.scale_decoder_outputs,  # transformers 5 reads this for the scaling
        decoder_start_token_id=cfg.decoder_start_token_id,
        pad_token_id=cfg.pad_token_id,
        eos_token_id=cfg.eos_token_id,
        dropout_rate=0.1,
        torch_dtype="float32",
    )


def settle_config(cfg: T5Config, getter: Callable[[str], np.ndarray], source: str) -> T5Config:
    """The config as the checkpoint's tensors settle it: the head is tied unless the file has an
    `lm_head.weight` that differs from `shared.weight` (transformers 5's rule, see above)."""
    try:
        shared = getter("shared.weight")
    except KeyError:
        return cfg  # import_params reports the missing tensor
    for name in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight"):
        embedding = _optional(getter, name)
        if embedding is not None and not np.array_equal(embedding, shared):
            raise ValueError(f"{source}: tensor {name!r} differs from 'shared.weight'; dpost's T5 has one input embedding")
    head = _optional(getter, "lm_head.weight")
    return cfg.replace(tie_word_embeddings=head is None or np.array_equal(head, shared))


def _optional(getter, name):
    try:
        return getter(name)
    except KeyError:
        return None


def hf_rules(cfg: T5Config) -> list[TensorRule]:
    """One rule per dpost parameter; `{layer}` names are stacked along each stack's `layers` axis."""
    d, h, hd = cfg.d_model, cfg.num_heads, cfg.d_kv
    gated, _ = parse_feed_forward_proj(cfg.feed_forward_proj)
    proj_in = (lambda w: w.T.reshape(d, h, hd)), (lambda p: p.reshape(d, h * hd).T)  # HF [h*hd, d]
    proj_out = (lambda w: w.T.reshape(h, hd, d)), (lambda p: p.reshape(h * hd, d).T)  # HF [d, h*hd]
    transpose = np.transpose, np.transpose

    def attention(path, prefix, depth):
        return [
            TensorRule(path + ("q",), prefix + "q.weight", *proj_in, stacked=True, num_layers=depth),
            TensorRule(path + ("k",), prefix + "k.weight", *proj_in, stacked=True, num_layers=depth),
            TensorRule(path + ("v",), prefix + "v.weight", *proj_in, stacked=True, num_layers=depth),
            TensorRule(path + ("o",), prefix + "o.weight", *proj_out, stacked=True, num_layers=depth),
        ]

    def stacked(path, name, depth, convert=()):
        return TensorRule(path, name, *convert, stacked=True, num_layers=depth)

    def mlp(path, prefix, depth):
        names = ("wi_0", "wi_1", "wo") if gated else ("wi", "wo")
        return [stacked(path + (n,), f"{prefix}DenseReluDense.{n}.weight", depth, transpose) for n in names]

    rules = [TensorRule(("embed",), "shared.weight")]
    for stack, depth in (("encoder", cfg.num_layers), ("decoder", cfg.num_decoder_layers)):
        block = f"{stack}.block.{{layer}}.layer."
        rules += [
            TensorRule((stack, "relpos"), f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"),
            TensorRule((stack, "final_norm", "scale"), f"{stack}.final_layer_norm.weight"),
        ]
        if stack == "encoder":
            rules += [stacked((stack, "layers", "attn_norm", "scale"), block + "0.layer_norm.weight", depth)]
            rules += attention((stack, "layers", "attn"), block + "0.SelfAttention.", depth)
            rules += [stacked((stack, "layers", "mlp_norm", "scale"), block + "1.layer_norm.weight", depth)]
            rules += mlp((stack, "layers", "mlp"), block + "1.", depth)
        else:
            rules += [stacked((stack, "layers", "self_attn_norm", "scale"), block + "0.layer_norm.weight", depth)]
            rules += attention((stack, "layers", "self_attn"), block + "0.SelfAttention.", depth)
            rules += [stacked((stack, "layers", "cross_attn_norm", "scale"), block + "1.layer_norm.weight", depth)]
            rules += attention((stack, "layers", "cross_attn"), block + "1.EncDecAttention.", depth)
            rules += [stacked((stack, "layers", "mlp_norm", "scale"), block + "2.layer_norm.weight", depth)]
            rules += mlp((stack, "layers", "mlp"), block + "2.", depth)
    if not cfg.tie_word_embeddings:
        rules.append(TensorRule(("lm_head",), "lm_head.weight", *transpose))
    return rules
