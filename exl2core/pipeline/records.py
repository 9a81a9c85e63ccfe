"""Measurement records by slot: the one place that knows the two shapes of a module's entry.

In ``measurement.json`` (exl2-format §5.5) a module of one slot stores its candidate records as a bare
list; a module of several slots (a parallel decoder's attention and MLP tables) stores a dict of such
lists keyed by table. A fast measurement's ``predicted_kl`` has the same shapes. Code that reads records
goes through :func:`slot_key` / :func:`slot_records` / :func:`entry_lists` / :func:`by_slot` instead of
branching on the shape itself.
"""

from __future__ import annotations

from typing import Any

from exl2core.plan import Module, Slot

SlotKey = tuple[str, "str | None"]
"""Where a slot's records are: its module's measurement key, and its table within a multi-slot entry
(None when the entry is the slot's list itself)."""


def slot_key(module: Module, slot: Slot) -> SlotKey:
    """The measurement key of ``slot`` of ``module``."""
    return module.measurement_key, (slot.table if len(module.slots) > 1 else None)


def slot_records(entry: Any, table: str | None) -> list | None:
    """The record list of one slot in a module's ``entry`` (``table`` from :func:`slot_key`), or None
    when the entry holds no list there (missing, malformed, or of the other shape)."""
    if table is not None:
        entry = entry.get(table) if isinstance(entry, dict) else None
    return entry if isinstance(entry, list) else None


def entry_lists(entry: Any) -> list[list]:
    """Every slot's record list in a module's ``entry``, in table order (none for an unmeasured module)."""
    if isinstance(entry, dict):
        return [v for v in entry.values() if isinstance(v, list)]
    return [entry] if isinstance(entry, list) else []


def by_slot(measurement: dict[str, Any]) -> dict[SlotKey, list]:
    """Every slot's record list of a measurement (or predicted-KL) dict, in file order; entries without
    records (the final norm and head: None) are left out."""
    out: dict[SlotKey, list] = {}
    for key, entry in measurement.items():
        if isinstance(entry, dict):
            out.update({(key, table): v for table, v in entry.items() if isinstance(v, list)})
        elif isinstance(entry, list) and entry:
            out[(key, None)] = entry
    return out


def slot_name(key: SlotKey) -> str:
    """``key`` as one string, ``module`` or ``module[table]``."""
    name, table = key
    return name if table is None else f"{name}[{table}]"
