"""Flan-T5-Base: the same config as `--config configs/flan_t5.py:base` (see there)."""

import os
import runpy


def get_config():
    return runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "flan_t5.py"))["get_config"]("base")
