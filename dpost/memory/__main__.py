"""Command line of the memory plan: prints, per device, what each stage of a config needs.

    python -m dpost.memory --config configs/llama2_7b.py [--mesh data=1,fsdp=8,tensor=1] \
        [--device_memory_gb 80] [--num_devices 16] [--check]

Device memory: --device_memory_gb, else the first device's memory_stats, else (CPU) host RAM / local
device count. --check exits with status 1, and the reason, when a stage this config runs does not fit.
"""

from __future__ import annotations

import sys

from dpost.memory.planner import check_fits, plan
from dpost.memory.report import GiB


def parse_mesh(text: str) -> dict[str, int]:
    """'data=1,fsdp=8,tensor=2' -> dict (missing axes are 1)."""
    out = {}
    for part in filter(None, (x.strip() for x in text.split(","))):
        axis, sep, value = part.partition("=")
        if not sep:
            raise ValueError(f"--mesh {text!r}: expected axis=size pairs like data=1,fsdp=8,tensor=1")
        out[axis.strip()] = int(value)
    return out


def main(argv=None) -> int:
    from absl import app, flags
    from ml_collections import config_flags

    config_flag = config_flags.DEFINE_config_file("config", None, "Path to a configs/*.py file.", lock_config=True)
    mesh_flag = flags.DEFINE_string("mesh", None, "Mesh shape, e.g. data=1,fsdp=8,tensor=1 (default: config.mesh).")
    mem_flag = flags.DEFINE_float("device_memory_gb", None, "Memory per device in GiB (default: read from the device).")
    ndev_flag = flags.DEFINE_integer("num_devices", None, "Device count that resolves a -1 in the mesh.")
    check_flag = flags.DEFINE_bool("check", False, "Exit with status 1 (and the reason) when a stage does not fit.")
    flags.mark_flag_as_required("config")

    def run(_argv) -> int:
        config = config_flag.value
        try:
            mesh = parse_mesh(mesh_flag.value) if mesh_flag.value else None
            mem = int(mem_flag.value * GiB) if mem_flag.value else None
            result = plan(config, mesh, mem, num_devices=ndev_flag.value,
                          memory_source="--device_memory_gb" if mem else None,
                          config_name=flags.FLAGS["config"].config_filename)
        except (ValueError, FileNotFoundError) as err:
            print(f"dpost.memory: error: {err}", file=sys.stderr)
            return 2
        print(result.table())
        if check_flag.value:
            try:
                check_fits(result)
            except ValueError as err:
                print(f"dpost.memory: {err}", file=sys.stderr)
                return 1
        return 0

    app.run(lambda a: sys.exit(run(a)), argv=argv)
    return 0


if __name__ == "__main__":
    main()
