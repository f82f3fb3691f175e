"""config.json of Llama-family checkpoints users name by hub id (public numbers): shapes for
offline planning."""

_LLAMA = dict(architectures=["LlamaForCausalLM"], model_type="llama", rms_norm_eps=1e-5, tie_word_embeddings=False,
              bos_token_id=1, eos_token_id=2)
_LLAMA_2 = dict(_LLAMA, vocab_size=32000, max_position_embeddings=4096, rope_theta=10000.0)
_TINYLLAMA = dict(_LLAMA, vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                  num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048, rope_theta=10000.0)

HF_CONFIGS: dict[str, dict] = {
    "meta-llama/Llama-2-7b-hf": dict(_LLAMA_2, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                     num_attention_heads=32, num_key_value_heads=32),
    "meta-llama/Llama-2-13b-hf": dict(_LLAMA_2, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                                      num_attention_heads=40, num_key_value_heads=40),
    "TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T": _TINYLLAMA,
    "TinyLlama/TinyLlama-1.1B-Chat-v1.0": _TINYLLAMA,
    "HuggingFaceTB/SmolLM2-135M-Instruct": dict(
        _LLAMA, vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192, rope_theta=100000.0,
        tie_word_embeddings=True,
    ),
}

# GGUF file stems (files named in configs but absent here, e.g. configs/smollm2_gsm8k.py's) -> the hub
# id whose shapes they hold.
GGUF_FILES: dict[str, str] = {"SmolLM2-135M-Instruct": "HuggingFaceTB/SmolLM2-135M-Instruct"}
