"""Particle sizes through the real daemon (issue 15): simulated slurry frames written into
a watched folder the way probe software writes them, the real daemon segmenting,
measuring and classifying them, a real Mosquitto and paho subscriber, a real asyncua
client, and `crystal-monitor export --what particles` in a subprocess. What comes out
is checked against the simulator's ground truth for every particle.

One daemon run per slurry (a module fixture), several tests reading what it produced.
"""

from __future__ import annotations

import asyncio
import csv
import io
import subprocess
import sys
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from asyncua import Client, ua

from monitor.aggregate import SIZE_BIN_EDGES
from monitor.config.settings import load_settings
from monitor.daemon import Daemon
from monitor.publishers.factory import create_publishers
from monitor.publishers.opcua_server import unece_unit_id
from monitor.runtime.publish_cycle import ManualSchedule
from monitor.simulator import FrameConfig, FrameSimulator
from monitor.simulator.frames import ParticleTruth
from monitor.simulator.profiles import ConstantProfile
from monitor.simulator.writer import image_file_name
from tests.daemon_process import wait_for, write_like_probe
from tests.mosquitto import Received, Subscriber, free_port, running_mosquitto
from tests.schemas import errors

SC = ua.StatusCodes
PREFIX = "cm-size"
PIXEL_SIZE_UM = 0.8  # the simulator's default: a ParticleView V19's
SPARSE_FRAMES = 16
DENSE_FRAMES = 8
CLASSES = ("CEX", "PG")


@dataclass
class Run:
    """What one daemon run left behind."""

    truths: dict[str, list[ParticleTruth]]
    """File name -> the particles drawn in it."""
    fractions: dict[str, Any]
    """The last retained fractions message."""
    rows: list[dict[str, str]]
    """`export --what particles`."""
    opcua: dict[str, Any]
    """Sizes/<class>/<leaf> -> DataValue, and the D50 nodes' units and ranges."""


def _settings(
    state: Path,
    folder: Path,
    pixel_size_um: float | None,
    broker: int | None,
    opcua: int | None,
    *,
    separation: str = "watershed",
) -> Any:
    probe: dict[str, Any] = {
        "id": "R1",
        "sampling": "particles",
        "particles": {"separation": separation},
        "source": {
            "type": "folder",
            "path": str(folder),
            "settle_time": "100ms",
            "rescan_interval": "1s",
        },
    }
    if pixel_size_um is not None:
        probe["pixel_size_um"] = pixel_size_um
    data: dict[str, Any] = {
        "daemon": {"state_dir": str(state), "shutdown_grace": "10s"},
        "aggregation": {"windows": ["60s", "300s"], "publish_interval": "1s"},
        "probes": [probe],
    }
    if broker is not None:
        data["mqtt"] = {"enabled": True, "port": broker, "topic_prefix": PREFIX}
    if opcua is not None:
        data["opcua"] = {
            "enabled": True,
            "security_profile": "demo",
            "endpoint": f"opc.tcp://127.0.0.1:{opcua}/crystal-monitor",
        }
    return load_settings(data=data)


def _write_frames(
    folder: Path, frames: int, density: float, seed: int
) -> dict[str, list[ParticleTruth]]:
    simulator = FrameSimulator(
        FrameConfig(profile=ConstantProfile(0.4), density=density), seed=seed
    )
    start = datetime.now(UTC) - timedelta(seconds=frames)
    truths = {}
    for index in range(frames):
        image, truth = simulator.render(float(index))
        name = image_file_name(start + timedelta(seconds=index), index)
        write_like_probe(folder, name, image)
        truths[name] = truth
    return truths


def _export_particles(state: Path) -> list[dict[str, str]]:
    command = [sys.executable, "-m", "monitor", "export", "--state-dir", str(state)]
    result = subprocess.run(
        [*command, "--what", "particles"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return list(csv.DictReader(io.StringIO(result.stdout)))


async def _read_sizes(port: int) -> dict[str, Any]:
    async with Client(f"opc.tcp://127.0.0.1:{port}/crystal-monitor", timeout=10) as client:
        ns = await client.get_namespace_index("urn:crystal-monitor")
        found: dict[str, Any] = {}
        for name in CLASSES:
            for leaf in ("D10", "D50", "D90", "Count"):
                node = client.get_node(ua.NodeId(f"CrystalMonitor.R1.Sizes.{name}.{leaf}", ns))
                found[f"{name}/{leaf}"] = await node.read_data_value(raise_on_bad_status=False)
            d50 = client.get_node(ua.NodeId(f"CrystalMonitor.R1.Sizes.{name}.D50", ns))
            found[f"{name}/D50/type"] = await d50.read_type_definition()
            found[f"{name}/D50/units"] = await (
                await d50.get_child("0:EngineeringUnits")
            ).read_value()
            found[f"{name}/D50/range"] = await (await d50.get_child("0:EURange")).read_value()
        return found


def _run_daemon(
    root: Path,
    *,
    frames: int,
    density: float,
    pixel_size_um: float | None,
    interfaces: bool,
    separation: str = "watershed",
) -> Run:
    state, folder = root / "state", root / "probe"
    folder.mkdir(parents=True)
    with running_mosquitto(root / "broker") if interfaces else nullcontext() as broker:
        opcua_port = free_port() if interfaces else None
        settings = _settings(
            state,
            folder,
            pixel_size_um,
            broker.port if broker else None,
            opcua_port,
            separation=separation,
        )
        schedule = ManualSchedule()
        daemon = Daemon(settings, publishers=create_publishers(settings), publish_schedule=schedule)
        topic = f"{PREFIX}/R1/fractions"
        with Subscriber(broker.port, [topic]) if broker else nullcontext() as sub:
            daemon.start()
            try:
                truths = _write_frames(folder, frames, density, seed=11)
                assert wait_for(lambda: daemon.recorder.recorded >= frames, timeout=120)
                schedule.tick()
                fractions: dict[str, Any] = {}
                opcua: dict[str, Any] = {}
                if sub is not None:

                    def counted(messages: list[Received]) -> bool:
                        return any(
                            m.topic == topic and m.json()["windows"]["300s"]["n"] > 0
                            for m in messages
                        )

                    assert sub.wait_for(counted, timeout=20)
                    fractions = sub.on(topic)[-1].json()
                    assert opcua_port is not None
                    opcua = asyncio.run(_read_sizes(opcua_port))
            finally:
                daemon.stop()
    return Run(truths, fractions, _export_particles(state), opcua)


@pytest.fixture(scope="module")
def sparse(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    yield _run_daemon(
        tmp_path_factory.mktemp("sparse"),
        frames=SPARSE_FRAMES,
        density=0.0,
        pixel_size_um=PIXEL_SIZE_UM,
        interfaces=True,
    )


def _iou(a: tuple[int, ...], b: tuple[int, ...]) -> float:
    ix = max(0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


def _box(row: dict[str, str]) -> tuple[int, int, int, int]:
    return int(row["x"]), int(row["y"]), int(row["w"]), int(row["h"])


def _matches(run: Run) -> list[tuple[ParticleTruth, dict[str, str] | None]]:
    """Each in-focus drawn particle with the exported row of its frame whose box overlaps
    it best at IoU >= 0.5 (None when no row does)."""
    by_key: dict[str, list[dict[str, str]]] = {}
    for row in run.rows:
        by_key.setdefault(row["key"], []).append(row)
    pairs = []
    for key, truths in run.truths.items():
        rows = by_key.get(key, [])
        for truth in truths:
            if not truth.in_focus or truth.ecd_px == 0:
                continue
            best = max(rows, key=lambda row, t=truth: _iou(t.bbox, _box(row)), default=None)
            ok = best is not None and _iou(truth.bbox, _box(best)) >= 0.5
            pairs.append((truth, best if ok else None))
    return pairs


def _hazen_d50(values: list[float]) -> float:
    return float(np.quantile(values, 0.5, method="hazen"))


# -- what the daemon publishes -------------------------------------------------------


def test_the_fractions_message_carries_each_classs_size_distribution_in_micrometres(
    sparse: Run,
) -> None:
    """The retained fractions message follows its schema; each window's `sizes` counts
    the confidently classified particles the export lists, with their D50 (Hazen) in
    um, on the fixed bins."""
    assert errors("fractions.json", sparse.fractions) == []
    sizes = sparse.fractions["windows"]["300s"]["sizes"]
    assert sizes["unit"] == "um" and sizes["measure"] == "ecd"
    assert sizes["bin_edges"] == pytest.approx(list(SIZE_BIN_EDGES), rel=1e-5)
    for name in CLASSES:
        ecd = [
            float(row["ecd"])
            for row in sparse.rows
            if row["class"] == name and row["status"] == "ok" and row["ecd"]
        ]
        published = sizes["classes"][name]
        assert published["count"] == len(ecd) > 20
        assert published["d50"] == pytest.approx(_hazen_d50(ecd), rel=1e-4)
        assert sum(published["histogram"]) == len(ecd)
        assert published["d10"] < published["d50"] < published["d90"]
        assert published["d50"] < published["d50_sq"]  # ECD² favours the large ones
        assert 0 < published["mean_aspect_ratio"] <= 1
    # Needles are long and thin, agglomerates round.
    assert (
        sizes["classes"]["CEX"]["mean_aspect_ratio"] < sizes["classes"]["PG"]["mean_aspect_ratio"]
    )


def test_opcua_serves_each_classs_d10_d50_d90_as_analog_items_in_micrometres(
    sparse: Run,
) -> None:
    sizes = sparse.fractions["windows"]["300s"]["sizes"]["classes"]
    for name in CLASSES:
        for leaf in ("D10", "D50", "D90"):
            value = sparse.opcua[f"{name}/{leaf}"]
            assert value.StatusCode.value == SC.Good
            assert value.Value.Value == pytest.approx(sizes[name][leaf.lower()], rel=1e-5)
        assert sparse.opcua[f"{name}/Count"].Value.Value == sizes[name]["count"]
        assert sparse.opcua[f"{name}/D50/type"] == ua.NodeId(ua.ObjectIds.AnalogItemType)
        units = sparse.opcua[f"{name}/D50/units"]
        assert units.UnitId == unece_unit_id("4H") and units.DisplayName.Text == "µm"
        eu_range = sparse.opcua[f"{name}/D50/range"]
        assert (eu_range.Low, eu_range.High) == (0.0, 10_000.0)


# -- against the ground truth ----------------------------------------------------------


def test_export_lists_every_particle_with_its_call_box_and_size_in_micrometres(
    sparse: Run,
) -> None:
    rows = sparse.rows
    assert set(rows[0]) >= {
        "ts", "probe", "key", "class", "status", "reason", "x", "y", "w", "h",
        "area", "ecd", "feret_max", "feret_min", "aspect_ratio", "unit",
    }  # fmt: skip
    assert {row["key"] for row in rows} == set(sparse.truths)
    assert all(row["probe"] == "R1" and row["ts"].endswith("Z") for row in rows)
    assert {row["unit"] for row in rows} == {"um"}
    assert {row["class"] for row in rows} <= set(CLASSES)
    for row in rows:
        assert (row["status"], row["reason"]) in {
            ("ok", ""),
            ("uncertain", "low_confidence"),
            ("uncertain", "out_of_distribution"),
        }
        ecd, area = float(row["ecd"]), float(row["area"])
        assert ecd == pytest.approx(np.sqrt(4 * area / np.pi), rel=1e-4)
        assert float(row["feret_min"]) <= float(row["feret_max"])
        assert float(row["aspect_ratio"]) == pytest.approx(
            float(row["feret_min"]) / float(row["feret_max"]), rel=1e-4
        )
        # A particle's equivalent circle lies within its box.
        assert ecd <= PIXEL_SIZE_UM * np.hypot(int(row["w"]), int(row["h"]))


def test_export_rows_match_the_drawn_particles_one_by_one(sparse: Run) -> None:
    """Sparse slurry: nearly every in-focus particle drawn has a row whose box overlaps
    it at IoU >= 0.5, and a lone particle's ECD is its drawn one within 15 %."""
    pairs = _matches(sparse)
    found = [(truth, row) for truth, row in pairs if row is not None]
    assert len(found) >= 0.8 * len(pairs), (len(found), len(pairs))
    ratios = [
        float(row["ecd"]) / (truth.ecd_px * PIXEL_SIZE_UM)
        for truth, row in found
        if not truth.touching
    ]
    assert float(np.median(np.abs(np.log(ratios)))) < np.log(1.15), np.quantile(
        ratios, [0.1, 0.5, 0.9]
    )


def _d50_errors(run: Run) -> dict[str, tuple[float, float, int]]:
    """Per class: (measured D50 over the rows the model called that class confidently,
    true D50 over the in-focus particles drawn of that class, measured count)."""
    found = {}
    for name in CLASSES:
        measured = [
            float(row["ecd"])
            for row in run.rows
            if row["class"] == name and row["status"] == "ok" and row["ecd"]
        ]
        drawn = [
            truth.ecd_px * PIXEL_SIZE_UM
            for truths in run.truths.values()
            for truth in truths
            if truth.label == name and truth.in_focus and truth.ecd_px > 0
        ]
        found[name] = (_hazen_d50(measured), _hazen_d50(drawn), len(measured))
    return found


# The accuracy targets, end to end: the D50 of every particle the model calls a
# class confidently (what the operator is shown; bench/instances.py compares only the
# matched particles) against the drawn in-focus particles of that class. Sparse, CEX:
# met since each edge is placed on a 2 x 2 px grid (particles.refine_edges), 3.6 % low
# (measured 2026-12-07; 9 % before, when a bundle's faint needles were cut off). Sparse,
# PG: not met, 7.4 % low (12 % before): a lone agglomerate's ECD is 0.98 of its drawn
# one at the median, but a tenth measure 10 % small or more (a grainy rim whose grains
# lie further apart than the truth's 5 px closing: the truth counts the light an
# agglomerate takes away as well as what it adds), and touching agglomerates share the
# pixels of their overlap, which the truth counts to both. Dense, with separation =
# "auto" (the learned detector on crowded frames; recall 0.66 in bench/instances.py,
# 0.05 with the watershed): CEX within 10 %, PG not met, 21 % low here (measured
# 2026-12-08; -10 % over the matched particles in the bench): agglomerates under
# needles are cut where a crossing bundle's centre is nearer, and the ones the model
# calls PG confidently are the smaller, clearer ones. Strict: the day these measure
# right they fail as XPASS and the marks must go.
_D50_NOT_MET = "grainy rims and overlapping agglomerates measure small (see above)"
_DENSE_D50_NOT_MET = "dense PG D50 21 % low with the learned detector (see above)"


def test_cex_d50_is_within_5_percent_of_the_truth_in_a_sparse_slurry(sparse: Run) -> None:
    measured, true, count = _d50_errors(sparse)["CEX"]
    assert count >= 50, count
    assert measured == pytest.approx(true, rel=0.05), (measured, true)


@pytest.mark.xfail(strict=True, reason=_D50_NOT_MET)
def test_pg_d50_is_within_5_percent_of_the_truth_in_a_sparse_slurry(sparse: Run) -> None:
    measured, true, count = _d50_errors(sparse)["PG"]
    assert count >= 50, count
    assert measured == pytest.approx(true, rel=0.05), (measured, true)


@pytest.fixture(scope="module")
def dense(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    yield _run_daemon(
        tmp_path_factory.mktemp("dense"),
        frames=DENSE_FRAMES,
        density=1.0,
        pixel_size_um=PIXEL_SIZE_UM,
        interfaces=False,
        separation="auto",  # a dense frame goes to the learned detector
    )


@pytest.mark.xfail(strict=True, reason=_DENSE_D50_NOT_MET)
def test_d50_per_class_is_within_10_percent_of_the_truth_in_a_dense_slurry(dense: Run) -> None:
    for name, (measured, true, count) in _d50_errors(dense).items():
        assert count >= 40, (name, count)  # few are separated in a dense slurry
        assert measured == pytest.approx(true, rel=0.10), (name, measured, true)


# -- without a pixel size ----------------------------------------------------------------


def test_without_a_pixel_size_every_output_says_px(tmp_path: Path) -> None:
    """No probes.pixel_size_um: export and MQTT carry pixel values said to be px; OPC UA,
    which serves micrometres only, leaves D10/D50/D90 null with BadConfigurationError."""
    run = _run_daemon(tmp_path, frames=2, density=0.0, pixel_size_um=None, interfaces=True)
    assert run.rows and {row["unit"] for row in run.rows} == {"px"}
    sizes = run.fractions["windows"]["300s"]["sizes"]
    assert errors("fractions.json", run.fractions) == []
    assert sizes["unit"] == "px"
    ecd = [float(r["ecd"]) for r in run.rows if r["class"] == "CEX" and r["status"] == "ok"]
    assert sizes["classes"]["CEX"]["d50"] == pytest.approx(_hazen_d50(ecd), rel=1e-4)
    for name in CLASSES:
        for leaf in ("D10", "D50", "D90"):
            value = run.opcua[f"{name}/{leaf}"]
            assert value.Value.Value is None
            assert value.StatusCode.value == SC.BadConfigurationError
        assert run.opcua[f"{name}/Count"].Value.Value == sizes["classes"][name]["count"]
