"""Plugin discovery, architecture claims, config loading and plan resolution.

Built-in plugins are found exactly like third-party ones: through the ``exl2core.architectures``
entry-point group. The core never imports a plugin by name; the pipeline gets what the plugins
decide through :class:`Plugins`, which the job holds, and the plan it returns.
"""

from __future__ import annotations

import json
from collections.abc import Collection
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import pluggy

from exl2core import hookspecs
from exl2core.errors import Exl2Error
from exl2core.model.config import ModelConfig
from exl2core.plan import ModelPlan

ENTRY_POINT_GROUP = "exl2core.architectures"


@dataclass(frozen=True)
class PluginInfo:
    name: str
    source: str
    architectures: tuple[str, ...]


class Plugins:
    """A set of architecture plugins, as one pluggy manager holds them."""

    def __init__(self, pm: pluggy.PluginManager):
        self.pm = pm

    @classmethod
    def discover(cls) -> "Plugins":
        """The plugins installed under :data:`ENTRY_POINT_GROUP`."""
        pm = pluggy.PluginManager("exl2core")
        pm.add_hookspecs(hookspecs)
        pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
        return cls(pm)

    def infos(self) -> list[PluginInfo]:
        dists = {self.pm.get_name(plugin): f"{dist.project_name} {dist.version} ({getattr(plugin, '__name__', '?')})"
                 for plugin, dist in self.pm.list_plugin_distinfo()}
        out = []
        for name, plugin in self.pm.list_name_plugin():
            impl = getattr(plugin, "exl2_architectures", None)
            archs = tuple(impl()) if impl else ()
            out.append(PluginInfo(name, dists.get(name, getattr(plugin, "__name__", "?")), archs))
        return out

    def claims(self) -> dict[str, str]:
        """Architecture (or model_type) name → the plugin claiming it; two claims of one name are refused."""
        owner: dict[str, str] = {}
        for info in self.infos():
            for arch in info.architectures:
                if owner.setdefault(arch, info.name) != info.name:
                    raise Exl2Error(f"architecture '{arch}' is claimed by two plugins, {owner[arch]} and "
                                    f"{info.name}; uninstall one of them")
        return owner

    def load_config(self, model_dir: str | Path) -> ModelConfig:
        """config.json of ``model_dir`` with the keys plugins supply for configs that omit them."""
        return ModelConfig.load(model_dir, defaults=self.config_defaults)

    def config_defaults(self, raw: dict) -> dict:
        """``raw`` with the plugins' ``exl2_config_defaults`` filled in (see the hook)."""
        raw = json.loads(json.dumps(raw))
        target = raw["text_config"] if isinstance(raw.get("text_config"), dict) else raw
        for defaults in self.pm.hook.exl2_config_defaults(raw=raw):
            for key, value in (defaults or {}).items():
                target.setdefault(key, value)
        return raw

    def resolve_plan(self, config: ModelConfig, arch: str | None = None,
                     tensor_names: Collection[str] = ()) -> ModelPlan:
        """Build the plan for ``config`` (and the checkpoint's ``tensor_names``); ``arch`` overrides the
        architecture named in config.json and may be an architecture or a plugin name (``--arch mixtral``)."""
        infos = self.infos()
        claims = self.claims()
        wanted = arch or config.architecture
        by_plugin = {p.name: p for p in infos}
        candidates = [wanted]
        if wanted in by_plugin:
            candidates = [a for a in by_plugin[wanted].architectures if a == config.architecture] \
                or list(by_plugin[wanted].architectures)
        if not any(c in claims for c in candidates) and config.model_type in claims and arch is None:
            candidates = [config.model_type]
        names = frozenset(tensor_names)
        for name in candidates:
            if name in claims:
                others = [p for p in self.pm.get_plugins() if self.pm.get_name(p) != claims[name]]
                ask = self.pm.subset_hook_caller("exl2_model_plan", remove_plugins=others)
                plan = ask(config=config, architecture=name, tensor_names=names)
                if plan is not None:
                    return plan
        listing = "; ".join(f"{p.name}: {', '.join(p.architectures)}" for p in infos) or "none"
        raise Exl2Error(
            f"no installed plugin handles architecture '{wanted}' (installed: {listing}). "
            f"Install a plugin for it or write one (docs/writing-a-plugin.md)")


@lru_cache(maxsize=1)
def installed() -> Plugins:
    """The installed plugins, discovered once per process."""
    return Plugins.discover()


def reload_plugins() -> Plugins:
    """Forget the discovered plugins (after a plugin package was installed or removed)."""
    installed.cache_clear()
    return installed()


def installed_plugins() -> list[PluginInfo]:
    return installed().infos()


def load_config(model_dir: str | Path) -> ModelConfig:
    """:meth:`Plugins.load_config` of the installed plugins."""
    return installed().load_config(model_dir)


def resolve_plan(config: ModelConfig, arch: str | None = None, tensor_names: Collection[str] = ()) -> ModelPlan:
    """:meth:`Plugins.resolve_plan` of the installed plugins."""
    return installed().resolve_plan(config, arch, tensor_names)
