"""What a SIGHUP reload may change while the daemon runs, and what waits for a restart.

`plan_reload` is pure: it compares two validated `Settings` and returns the settings to
run on from now, built from the new file's live parts and the running configuration's
other parts. The live parts are declared once, in `LIVE_KEYS` and `LIVE_PROBE_KEYS`.
Everything else (model, backend, sources, windows, connections, ...) is reported as
needing a restart and keeps its running value, so the running daemon never sees a
half-applied change. `LiveReload` reads the file and applies a plan to the running
stages.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
from pydantic import BaseModel

from monitor.config.settings import (
    ConfigError,
    ProbeConfig,
    Settings,
    check_environment,
    load_settings,
)

log = structlog.get_logger(__name__)

LIVE_KEYS = (
    "alarms",
    "aggregation.publish_interval",
    "store.retention",
    "store.particle_retention",
)
"""Settings (dotted key paths) a reload applies at once; the README lists the same."""
LIVE_PROBE_KEYS = ("quality", "particles", "tiles")
"""Each probe's sections a reload applies at once (the image thresholds)."""
MODEL_SWAP_KEY = "model.path"
"""A changed model is loaded, checked and warmed up beside the running one, then swapped
in between batches (`Daemon.swap_model`); refused, the running model keeps going."""
SHADOW_KEY = "model.shadow"
"""A changed, added or removed shadow model: the running shadow (if any) finishes what it
has queued and stops, and the new one (if any) is loaded, warmed up and started
(`Daemon.replace_shadow`); a candidate that cannot start is logged and left out."""


@dataclass(frozen=True)
class ReloadPlan:
    settings: Settings
    """What the daemon runs on from now."""
    applied: tuple[str, ...]
    """Key paths that changed and take effect now."""
    needs_restart: tuple[str, ...]
    """Key paths that changed and take effect only after a restart."""
    new_model: Settings | None = None
    """The new file's settings when `model.path` changed: the daemon tries the swap and,
    when it succeeds, runs on `settings` with this model path from then on."""
    new_shadow: Settings | None = None
    """The new file's settings when `model.shadow` changed (set, changed or removed): the
    daemon replaces the shadow runner and runs with that `model.shadow` from then on."""

    @property
    def changed(self) -> bool:
        return bool(self.applied or self.needs_restart or self.new_model or self.new_shadow)


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
    model_changed = shadow_changed = False
    for path in _leaf_differences(old_dump, new_dump, ""):
        if path == MODEL_SWAP_KEY:
            model_changed = True
            continue
        if path == SHADOW_KEY or path.startswith(SHADOW_KEY + "."):
            shadow_changed = True
            continue
        live = any(path == p or path.startswith(p + ".") for p in LIVE_KEYS)
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
            if field in LIVE_PROBE_KEYS:
                applied.append(key)
                live_update[field] = getattr(new_probe, field)
            else:
                needs_restart.append(key)
        probes.append(old_probe.model_copy(update=live_update) if live_update else old_probe)

    settings = current
    for key in LIVE_KEYS:
        settings = _with_value(settings, key.split("."), _value_at(new, key.split(".")))
    settings = settings.model_copy(update={"probes": tuple(probes)})
    return ReloadPlan(
        settings,
        tuple(applied),
        tuple(needs_restart),
        new if model_changed else None,
        new if shadow_changed else None,
    )


def _value_at(model: BaseModel, path: list[str]) -> Any:
    value: Any = model
    for name in path:
        value = getattr(value, name)
    return value


def _with_value(model: Any, path: list[str], value: Any) -> Any:
    """A copy of `model` with the field at `path` set to `value` (copies along the path)."""
    head, *rest = path
    if not rest:
        return model.model_copy(update={head: value})
    return model.model_copy(update={head: _with_value(getattr(model, head), rest, value)})


class LiveReload:
    """Re-reads the configuration file and applies what can change live, through
    `apply(plan)` (the running stages' part); an invalid file is logged and the daemon
    keeps running on the configuration it has."""

    def __init__(
        self,
        current: Callable[[], Settings],
        apply: Callable[[ReloadPlan], Sequence[str] | None],
        status: Callable[[str], object],
        reloading: Callable[[], object],
    ) -> None:
        self._current = current
        self._apply = apply
        self._status = status  # systemd READY=1 with STATUS=
        self._reloading = reloading  # systemd RELOADING=1

    def reload(self, config_path: Path) -> ReloadPlan | None:
        self._reloading()
        try:
            new_settings = load_settings(config_path)
        except ConfigError as exc:
            problems = exc.problems
        else:
            problems = check_environment(new_settings)
        if problems:
            log.error(
                "config_reload_failed",
                config=str(config_path),
                problems=problems,
                action="kept the running configuration",
            )
            self._status(f"reload failed, running on the old config: {problems[0]}")
            return None
        plan = plan_reload(self._current(), new_settings)
        notes = list(self._apply(plan) or ())
        log.info(
            "config_reloaded",
            config=str(config_path),
            applied=list(plan.applied),
            needs_restart=list(plan.needs_restart),
            model=notes or None,
        )
        status = f"reloaded: {len(plan.applied)} change(s) applied"
        if plan.needs_restart:
            status += f", restart needed for {', '.join(plan.needs_restart)}"
        if notes:
            status += "; " + "; ".join(notes)
        self._status(status)
        return plan
