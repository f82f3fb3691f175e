"""T5 family (original T5, T5 v1.1, Flan-T5): `model` (config, module) and `params` (HF conversion)."""
