"""What a SIGHUP reload may change while the daemon runs, and what waits for a restart.

Pure: compares two validated `Settings` and returns the settings to run on from now,
built from the new file's live parts and the running configuration's other parts.
Live: alarm definitions and limits, the publish interval, store retention and each
probe's image thresholds (quality gate, particle segmentation, tiles). Everything else
(model, backend, sources, windows, connections, ...) is reported as needing a restart
and keeps its running value, so the running daemon never sees a half-applied change.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from monitor.config.settings import ProbeConfig, Settings

_PROBE_LIVE_FIELDS = ("quality", "particles", "tiles")
_LIVE_PREFIXES = ("alarms", "aggregation.publish_interval", "store.retention")


@dataclass(frozen=True)
class ReloadPlan:
    settings: Settings
    """What the daemon runs on from now."""
    applied: tuple[str, ...]
    """Key paths that changed and take effect now."""
    needs_restart: tuple[str, ...]
    """Key paths that changed and take effect only after a restart."""

    @property
    def changed(self) -> bool:
        return bool(self.applied or self.needs_restart)


def _leaf_differences(old: Any, new: Any, path: str) -> Iterator[str]:
    """Key paths under which two JSON-like values differ, as deep as both are mappings."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(old.keys() | new.keys()):
            child = f"{path}.{key}" if path else str(key)
            if key not in old or key not in new:
                yield child
            else:
                yield from _leaf_differences(old[key], new[key], child)
    elif old != new:
        yield path


def _probe_key(probe_id: str) -> str:
    return f"probes[{probe_id}]"


def plan_reload(current: Settings, new: Settings) -> ReloadPlan:
    """Split the differences between `current` and `new` into live and restart-bound."""
    old_dump = current.model_dump(mode="json", exclude={"probes"})
    new_dump = new.model_dump(mode="json", exclude={"probes"})
    applied: list[str] = []
    needs_restart: list[str] = []
    for path in _leaf_differences(old_dump, new_dump, ""):
        live = any(path == p or path.startswith(p + ".") for p in _LIVE_PREFIXES)
        (applied if live else needs_restart).append(path)

    old_probes = {probe.id: probe for probe in current.probes}
    new_probes = {probe.id: probe for probe in new.probes}
    if list(old_probes) != list(new_probes):
        needs_restart.append("probes (added, removed or reordered)")
    probes: list[ProbeConfig] = []
    for probe_id, old_probe in old_probes.items():
        new_probe = new_probes.get(probe_id)
        if new_probe is None:
            probes.append(old_probe)
            continue
        differences = _leaf_differences(
            old_probe.model_dump(mode="json"), new_probe.model_dump(mode="json"), ""
        )
        live_update: dict[str, Any] = {}
        for path in differences:
            key = f"{_probe_key(probe_id)}.{path}"
            field = path.split(".", 1)[0]
            if field in _PROBE_LIVE_FIELDS:
                applied.append(key)
                live_update[field] = getattr(new_probe, field)
            else:
                needs_restart.append(key)
        probes.append(old_probe.model_copy(update=live_update) if live_update else old_probe)

    settings = current.model_copy(
        update={
            "alarms": new.alarms,
            "aggregation": current.aggregation.model_copy(
                update={"publish_interval": new.aggregation.publish_interval}
            ),
            "store": current.store.model_copy(update={"retention": new.store.retention}),
            "probes": tuple(probes),
        }
    )
    return ReloadPlan(settings, tuple(applied), tuple(needs_restart))
