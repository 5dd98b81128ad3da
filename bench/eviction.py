"""Eviction cost over a long run: the registry with a full LRU, 1M distinct machines.

Issue 9, item 5: ``next(iter(dict))`` skips every slot deleted since the dict
last resized, so the relay's intake slowed the longer it evicted. This runs
the registry's update (the code both hubs call per event) next to the old
dict-based one, in one process, and prints µs per update for each slice of
the run. Conditions are printed with the figures.

    python bench/eviction.py [--machines 1000] [--updates 1000000] [--slices 10]
"""

from __future__ import annotations

import argparse
import platform
import time
from typing import Any

from fastrelay.registry import Registry


class OldRegistry:
    """The registry before the fix: a plain dict, re-inserted on update, evicted via next(iter())."""

    def __init__(self, max_machines: int) -> None:
        self.max_machines = max_machines
        self.machines: dict[str, dict[str, Any]] = {}

    def update(self, machine_id: str, event: dict[str, Any]) -> Any:
        machines = self.machines
        entry = machines.pop(machine_id, None)
        if entry is None:
            if len(machines) >= self.max_machines:
                del machines[next(iter(machines))]
            entry = {"id": machine_id, "current_state": None, "previous_state": None,
                     "last_activity": None, "data": None}
        machines[machine_id] = entry
        previous = entry["current_state"]
        entry["current_state"] = event["state"]
        return previous


def run(registry: Any, updates: int, slices: int) -> list[float]:
    per_slice = updates // slices
    event = {"type": "state_change", "state": "s", "timestamp": 1.0}
    update = registry.update
    out = []
    n = 0
    for _ in range(slices):
        start = time.perf_counter()
        for _ in range(per_slice):
            update(f"m{n}", event)
            n += 1
        out.append((time.perf_counter() - start) / per_slice * 1e6)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--machines", type=int, default=1000)
    parser.add_argument("--updates", type=int, default=1_000_000)
    parser.add_argument("--slices", type=int, default=10)
    args = parser.parse_args()
    print(f"# {platform.python_implementation()} {platform.python_version()}, "
          f"--max-machines {args.machines}, {args.updates:,} distinct machine ids, "
          f"µs per update by slice of {args.updates // args.slices:,}")
    old = run(OldRegistry(args.machines), args.updates, args.slices)
    new = run(Registry(args.machines), args.updates, args.slices)
    print("| slice | dict + next(iter()) | OrderedDict (fastrelay.registry) |")
    print("|---|---|---|")
    for i, (a, b) in enumerate(zip(old, new, strict=True)):
        print(f"| {i + 1} | {a:.2f} | {b:.2f} |")
    print(f"| last/first | {old[-1] / old[0]:.2f}x | {new[-1] / new[0]:.2f}x |")


if __name__ == "__main__":
    main()
