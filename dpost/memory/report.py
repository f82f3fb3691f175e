"""The memory plan as a table: one row per stage, the per-device bytes of each term, the verdict."""

from __future__ import annotations

from typing import Mapping

GiB = 1024**3


def fmt(n: int | None) -> str:
    if n is None:
        return "?"
    if n >= GiB:
        return f"{n / GiB:.2f} GiB"
    return f"{n / 1024**2:.1f} MiB"


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M" if n >= 1e6 else f"{n / 1e3:.1f} K"


def _cell(n: int | None, unit: int) -> str:
    if n is None:
        return "-"
    if n == 0:
        return "0"
    return f"{n / unit:.2f}" if unit == GiB else f"{n / unit:.1f}"


def remat_words(remat: str) -> str:
    return {"none": "off", "full": "on"}.get(remat, f"{remat} (weight-matmul outputs kept)")


def mesh_str(mesh: Mapping[str, int]) -> str:
    return ",".join(f"{k}={v}" for k, v in mesh.items())


def format_plan(p) -> str:
    """`p`: a `dpost.memory.planner.Plan`."""
    big = max(r.total for r in p.stages) >= GiB or (p.device_memory_bytes or 0) >= 64 * GiB
    unit, uname = (GiB, "GiB") if big else (1024**2, "MiB")
    lines = [
        f"dpost memory plan{': ' + p.config_name if p.config_name else ''}",
        f"model   {p.family} {p.source} ({_count(p.param_count)} params, fp32 masters {fmt(p.param_bytes)}; "
        f"shapes from {p.origin})",
        f"        compute {p.dtype}, remat {remat_words(p.remat)}",
        f"mesh    {mesh_str(p.mesh)} ({p.num_devices} device{'s' if p.num_devices != 1 else ''})",
        f"device  {fmt(p.device_memory_bytes)} per device ({p.device_memory_source})",
        f"per-device {uname}; * = stage this config runs; act = activations, the one in the total marked <",
        "",
    ]
    header = ["stage", "per device", "params", "grads", "optim", "ref", "w.copy", "act:remat", "act:full", "kv cache",
              "total", "use%", "verdict"]
    table = []
    for r in p.stages:
        t = r.terms
        training = "grads" in t
        ar = _cell(r.activations_remat, unit)
        an = _cell(r.activations_no_remat, unit)
        if training:
            ar, an = (ar + "<", an) if p.remat != "none" else (ar, an + "<")
        else:
            ar, an = (ar + "<", an + "<") if r.activations_remat == r.activations_no_remat else (ar, an)
        budget = p.device_memory_bytes
        table.append([
            ("* " if r.used else "  ") + r.stage, r.batch,
            _cell(t.get("params"), unit), _cell(t.get("grads"), unit) if training else "-",
            _cell(t.get("optimizer"), unit) if training else "-",
            _cell(t.get("ref params"), unit) if "ref params" in t else "-",
            _cell(t.get("weight copies"), unit), ar, an,
            _cell(t.get("kv cache"), unit) if "kv cache" in t else "-",
            _cell(r.total, unit), f"{100 * r.total / budget:.0f}%" if budget else "?",
            "fits" if p.fits(r) else "does not fit",
        ])
    widths = [max(len(str(x)) for x in col) for col in zip(header, *table)]
    fmt_row = lambda row: "  ".join(  # noqa: E731
        str(x).ljust(w) if i < 2 or i == len(row) - 1 else str(x).rjust(w) for i, (x, w) in enumerate(zip(row, widths))
    ).rstrip()
    lines.append(fmt_row(header))
    lines.append(fmt_row(["-" * w for w in widths]))
    lines.extend(fmt_row(row) for row in table)
    over = p.over_budget()
    lines.append("")
    if over:
        lines.append("verdict: does not fit: " + ", ".join(r.stage for r in over))
    else:
        lines.append("verdict: fits: every stage this config runs fits the device")
    for w in p.warnings:
        lines.append(f"warning: {w}")
    lines.append("terms and formulas: python -c 'import dpost.memory.formulas as f; help(f)'")
    return "\n".join(lines)

