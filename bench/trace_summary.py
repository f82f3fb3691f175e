"""Where a GPU trace's time goes: kernels per device stream, busy time and the biggest kernels.

    python bench/trace_summary.py FOLDER [--top 12] [--hlo DUMP]
    # FOLDER: a jax.profiler trace (bench/accelerator.py --profile); DUMP: the same run's
    # XLA_FLAGS="--xla_dump_to=DUMP --xla_dump_hlo_as_text" folder

For every `/device:GPU:*` plane of each `*.xplane.pb` under FOLDER: the number of kernel events
(and memcpy/memset events), the span from the first kernel's start to the last one's end, the time
at least one kernel ran (the union of their intervals) and the share of the span that was idle,
then the kernels with the most summed time. A span mostly idle means launch or host-sync bound,
not bandwidth or compute bound. With --hlo, each kernel named after an HLO instruction (XLA's own
fusions) is labelled with that instruction's result shape and source op (the last two components
of its `op_name`, e.g. `attn/reduce_sum`), and the "XLA Ops" line's time (which also names the
library calls, e.g. cuBLAS GEMMs) is summed per source op.
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re

_INSTRUCTION = re.compile(r'^\s*(?:ROOT )?%?([\w.\-]+) = (\S+) .*?op_name="([^"]+)"', re.M)


def hlo_name(name: str) -> str:
    """An HLO instruction's name as kernels and trace events spell it (`fusion.12` -> `fusion_12`)."""
    return name.lstrip("%").replace(".", "_").replace("-", "_")


def hlo_sources(paths) -> dict[str, tuple[str, str]]:
    """HLO instruction name (`hlo_name`) -> (result shape, the last two components of its op_name),
    from XLA text dumps (`*after_optimizations.txt`)."""
    sources = {}
    for path in paths:
        with open(path) as f:
            for name, shape, op in _INSTRUCTION.findall(f.read()):
                sources[hlo_name(name)] = (shape, "/".join(op.split("/")[-2:]))
    return sources


def busy_ns(intervals: list[tuple[int, int]]) -> int:
    """Length of the union of [start, end) intervals."""
    total, reach = 0, None
    for start, end in sorted(intervals):
        if reach is None or start > reach:
            total += end - start
            reach = end
        elif end > reach:
            total += end - reach
            reach = end
    return total


def by_source(times: dict[str, int], sources: dict[str, tuple[str, str]]) -> collections.Counter:
    """Summed time per (result shape, source op) of events named after HLO instructions; other
    names (library kernels without an instruction of that name) keep their own name."""
    total = collections.Counter()
    for name, ns in times.items():
        total[sources.get(hlo_name(name), ("", name))] += ns
    return total


def summarize(path: str, top: int, sources: dict[str, tuple[str, str]] | None = None) -> None:
    from jax.profiler import ProfileData

    for plane in ProfileData.from_file(path).planes:
        if not plane.name.startswith("/device:GPU"):
            continue
        intervals, by_name, copies = [], collections.Counter(), 0
        ops = collections.Counter()
        print(f"{plane.name} lines: " + ", ".join(f"{line.name} ({sum(1 for _ in line.events)})" for line in plane.lines))
        for line in plane.lines:
            if line.name == "XLA Ops":
                for event in line.events:
                    ops[event.name] += event.duration_ns
            if "stream" not in line.name.lower():  # "XLA Ops" / "XLA Modules" lines repeat the kernels
                continue
            for event in line.events:
                start, end = event.start_ns, event.start_ns + event.duration_ns
                intervals.append((start, end))
                by_name[event.name] += event.duration_ns
                copies += event.name.lower().startswith(("memcpy", "memset"))
        if not intervals:
            continue
        span = max(e for _, e in intervals) - min(s for s, _ in intervals)
        busy = busy_ns(intervals)
        print(f"{plane.name}: {len(intervals)} events ({copies} memcpy/memset), span {span / 1e6:.1f} ms, "
              f"busy {busy / 1e6:.1f} ms, idle {100 * (1 - busy / span):.0f}%")
        for name, ns in by_name.most_common(top):
            shape, op = (sources or {}).get(hlo_name(name), ("", ""))
            print(f"  {ns / 1e6:9.2f} ms  {100 * ns / busy:5.1f}%  {name[:60]}  {shape[:40]}  {op}")
        if sources and ops:
            print(f"{plane.name}: XLA Ops line by source op (share of busy time)")
            for (shape, op), ns in by_source(ops, sources).most_common(top):
                print(f"  {ns / 1e6:9.2f} ms  {100 * ns / busy:5.1f}%  {shape[:40]:<40}  {op}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder")
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--hlo", default=None, help="XLA dump folder of the traced run (--xla_dump_hlo_as_text)")
    args = ap.parse_args()
    sources = None
    if args.hlo:
        dumps = glob.glob(os.path.join(args.hlo, "**", "*after_optimizations.txt"), recursive=True)
        if not dumps:
            raise SystemExit(f"{args.hlo}: no *after_optimizations.txt under it")
        sources = hlo_sources(dumps)
    paths = sorted(glob.glob(os.path.join(args.folder, "**", "*.xplane.pb"), recursive=True))
    if not paths:
        raise SystemExit(f"{args.folder}: no *.xplane.pb under it")
    for path in paths:
        print(f"== {path}")
        summarize(path, args.top, sources)


if __name__ == "__main__":
    main()
