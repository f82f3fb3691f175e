"""Data: GSM8K and OOD loaders, per-family formatting, preference pairs and pseudo-labels,
the synthetic arithmetic task, and grain input pipelines.

Submodules are imported explicitly (``from dpost.data import gsm8k``) so that importing one does
not pull in the heavier ones (grain, tokenizers, transformers).
"""
