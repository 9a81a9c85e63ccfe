"""Default implementations of the optional hooks, registered before any plugin (plugins win)."""

from __future__ import annotations

from exl2core import hookimpl
from exl2core.plan import Module, ModelPlan


@hookimpl(trylast=True)
def exl2_hessian_groups(module: Module) -> list[list[str]]:
    groups: dict[str, list[str]] = {}
    for lin in module.linears:
        groups.setdefault(lin.input, []).append(lin.name)
    return list(groups.values())


@hookimpl(trylast=True)
def exl2_output_name(plan: ModelPlan, source_key: str) -> str:
    return source_key
