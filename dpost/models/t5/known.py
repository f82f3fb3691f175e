"""config.json of T5 checkpoints users name by hub id (public numbers): shapes for offline planning."""

_FLAN_T5 = dict(
    architectures=["T5ForConditionalGeneration"], model_type="t5", vocab_size=32128, d_kv=64,
    relative_attention_num_buckets=32, relative_attention_max_distance=128, feed_forward_proj="gated-gelu",
    tie_word_embeddings=False, layer_norm_epsilon=1e-6, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
)

HF_CONFIGS: dict[str, dict] = {
    "google/flan-t5-small": dict(_FLAN_T5, d_model=512, d_ff=1024, num_layers=8, num_decoder_layers=8, num_heads=6),
    "google/flan-t5-base": dict(_FLAN_T5, d_model=768, d_ff=2048, num_layers=12, num_decoder_layers=12, num_heads=12),
    "google/flan-t5-large": dict(_FLAN_T5, d_model=1024, d_ff=2816, num_layers=24, num_decoder_layers=24,
                                 num_heads=16),
}

# GGUF file stems (files named in configs but absent here) -> the hub id whose shapes they hold.
GGUF_FILES: dict[str, str] = {}
