"""Per-shard report parts, their sum over a run, and the table printed at the end."""

from __future__ import annotations

import json
import os
from pathlib import Path

from gritvlp.filtering.cat import REASONS


def empty_counts() -> dict:
    return {"seen": 0, "kept": 0, "dropped": {reason: 0 for reason in REASONS}}


def add_counts(total: dict, part: dict) -> None:
    total["seen"] += part["seen"]
    total["kept"] += part["kept"]
    for reason, n in part["dropped"].items():
        total["dropped"][reason] = total["dropped"].get(reason, 0) + n


def summarize(parts: dict[str, dict], settings: dict) -> dict:
    """{"settings", "totals", "shards"} from the parts of every input shard, keyed by output shard name."""
    totals = empty_counts()
    for part in parts.values():
        add_counts(totals, part)
    totals["damaged_shards"] = sorted(name for name, part in parts.items() if part["damaged"])
    return {"settings": settings, "totals": totals, "shards": parts}


def write_json(path: str | Path, obj) -> None:
    """Atomic: a reader (or a resumed run) never sees half a file."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def format_table(report: dict) -> str:
    totals = report["totals"]
    seen = totals["seen"]

    def row(name: str, n: int) -> str:
        share = f"{100 * n / seen:.1f}%" if seen else "-"
        return f"{name:<20}{n:>10}{share:>8}"

    lines = [f"CAT filter: {len(report['shards'])} shard(s), {seen} pairs", f"{'':<20}{'pairs':>10}{'share':>8}"]
    lines += [row(f"drop {reason}", n) for reason, n in totals["dropped"].items()]
    lines.append(row("kept", totals["kept"]))
    if totals["damaged_shards"]:
        lines.append(f"damaged input shards (read up to the damage): {', '.join(totals['damaged_shards'])}")
    return "\n".join(lines)
