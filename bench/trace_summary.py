"""Where a GPU trace's time goes: kernels per device stream, busy time and the biggest kernels.

    python bench/trace_summary.py FOLDER [--top 12]   # FOLDER: a jax.profiler trace (bench/accelerator.py --profile)

For every `/device:GPU:*` plane of each `*.xplane.pb` under FOLDER: the number of kernel events
(and memcpy/memset events), the span from the first kernel's start to the last one's end, the time
at least one kernel ran (the union of their intervals) and the share of the span that was idle,
then the kernels with the most summed time. A span mostly idle means launch or host-sync bound,
not bandwidth or compute bound.
"""

from __future__ import annotations

import argparse
import collections
import glob
import os


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


def summarize(path: str, top: int) -> None:
    from jax.profiler import ProfileData

    for plane in ProfileData.from_file(path).planes:
        if not plane.name.startswith("/device:GPU"):
            continue
        intervals, by_name, copies = [], collections.Counter(), 0
        print(f"{plane.name} lines: " + ", ".join(f"{line.name} ({sum(1 for _ in line.events)})" for line in plane.lines))
        for line in plane.lines:
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
            print(f"  {ns / 1e6:9.2f} ms  {100 * ns / busy:5.1f}%  {name[:100]}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder")
    ap.add_argument("--top", type=int, default=12)
    args = ap.parse_args()
    paths = sorted(glob.glob(os.path.join(args.folder, "**", "*.xplane.pb"), recursive=True))
    if not paths:
        raise SystemExit(f"{args.folder}: no *.xplane.pb under it")
    for path in paths:
        print(f"== {path}")
        summarize(path, args.top)


if __name__ == "__main__":
    main()
