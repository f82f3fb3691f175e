"""dpost: DPO-augmented self-training (DPO-ST) for chain-of-thought math, in JAX."""

from setuptools import find_packages, setup

setup(
    name="dpost",
    version="0.1.0",
    description="DPO-augmented self-training (Wang, Li & Lu, ACL 2024) in JAX",
    packages=find_packages(include=["dpost", "dpost.*"]),
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.6",
        "flax>=0.10",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11",
        "transformers>=4.50",
        "tokenizers>=0.21",
        "sentencepiece",
        "protobuf",
        "safetensors",
        "datasets>=3.0",
        "grain>=0.2.10",
        "ml_collections>=1.0",
        "gguf>=0.16",
        "tqdm",
        "tensorboardX",
        "matplotlib",
        "numpy",
        "scipy",
    ],
    extras_require={
        # References and peers for tests/benchmarks only: never imported by dpost itself.
        "test": ["pytest", "pytest-xdist", "torch==2.13.0", "accelerate", "trl"],
    },
)
