"""Memory plan: per-device bytes of every DPO-ST stage, before anything is allocated.

    python -m dpost.memory --config configs/llama2_7b.py --mesh fsdp=8 --device_memory_gb 80

`planner` (the plan, the fit check the driver runs), `formulas` (the terms, with their notation),
`shards` (parameter bytes per device on an abstract mesh), `report` (the table). Model shapes come
from `dpost.models.shapes`, so nothing is downloaded or allocated and a laptop plans any pod size.
"""

from dpost.memory.planner import (Plan, StageRow, check_fits, check_run, default_device_memory, plan,
                                  planning_layout)
from dpost.memory.report import format_plan

__all__ = ["Plan", "StageRow", "plan", "planning_layout", "check_fits", "check_run", "default_device_memory",
           "format_plan"]
