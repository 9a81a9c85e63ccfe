"""Plugin discovery and architecture lookup.

Built-in plugins are found exactly like third-party ones: through the ``exl2core.architectures``
entry-point group. The core never imports a plugin by name.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import pluggy

from exl2core import defaults, hookspecs
from exl2core.errors import Exl2Error
from exl2core.model.config import ModelConfig
from exl2core.plan import ModelPlan

ENTRY_POINT_GROUP = "exl2core.architectures"


@dataclass(frozen=True)
class PluginInfo:
    name: str
    source: str
    architectures: tuple[str, ...]


@lru_cache(maxsize=1)
def plugin_manager() -> pluggy.PluginManager:
    pm = pluggy.PluginManager("exl2core")
    pm.add_hookspecs(hookspecs)
    pm.register(defaults, name="exl2core.defaults")
    pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
    return pm


def reload_plugins() -> pluggy.PluginManager:
    """Forget the cached manager (after a plugin package was installed or removed)."""
    plugin_manager.cache_clear()
    return plugin_manager()


def installed_plugins() -> list[PluginInfo]:
    pm = plugin_manager()
    dists = dict(_dist_of_plugins(pm))
    out = []
    for name, plugin in pm.list_name_plugin():
        if plugin is defaults:
            continue
        impl = getattr(plugin, "exl2_architectures", None)
        archs = tuple(impl()) if impl else ()
        out.append(PluginInfo(name, dists.get(name, getattr(plugin, "__name__", "?")), archs))
    return out


def _dist_of_plugins(pm: pluggy.PluginManager):
    for plugin, dist in pm.list_plugin_distinfo():
        yield pm.get_name(plugin), f"{dist.project_name} {dist.version} ({getattr(plugin, '__name__', '?')})"


def resolve_plan(config: ModelConfig, arch: str | None = None) -> ModelPlan:
    """Build the plan for ``config``; ``arch`` overrides the architecture named in config.json.

    ``arch`` may be an architecture name or a plugin name (``--arch mixtral``)."""
    pm = plugin_manager()
    plugins = installed_plugins()
    wanted = arch or config.architecture
    by_plugin = {p.name: p for p in plugins}
    candidates = [wanted]
    if wanted in by_plugin:
        candidates = [a for a in by_plugin[wanted].architectures if a == config.architecture] \
            or list(by_plugin[wanted].architectures)
    served = {a for p in plugins for a in p.architectures}
    if not any(c in served for c in candidates) and config.model_type in served and arch is None:
        candidates = [config.model_type]
    for name in candidates:
        if name in served:
            plan = pm.hook.exl2_model_plan(config=config, architecture=name)
            if plan is not None:
                return plan
    listing = "; ".join(f"{p.name}: {', '.join(p.architectures)}" for p in plugins) or "none"
    raise Exl2Error(
        f"no installed plugin handles architecture '{wanted}' (installed: {listing}). "
        f"Install a plugin for it or write one (docs/writing-a-plugin.md)")
