"""The web package against a fake read model: what /readyz, /api/state and /metrics say
is what the view hands out, with no daemon behind it."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from monitor.runtime.view import Health
from monitor.web import views
from monitor.web.metrics import create_registry, render_metrics
from tests.fake_view import FakeView, a_frame, as_view


def test_readiness_names_the_store_problem_and_each_source_and_publisher() -> None:
    fake = FakeView(
        problem="store crystal-monitor.sqlite cannot be written: disk full (retrying)",
        source_health=[Health("R1", False, "folder /srv/probe/R1 missing")],
        publisher_health=[Health("mqtt", True, "connected")],
    )
    checks = {check.name: check for check in views.readiness_checks(as_view(fake))}
    assert checks["model"].ok and fake.manifest.name in checks["model"].detail
    assert checks["model"].detail.endswith("on onnxruntime[cpu]")
    assert not checks["store"].ok and "disk full" in checks["store"].detail
    assert (checks["source R1"].ok, checks["source R1"].detail) == (
        False,
        "folder /srv/probe/R1 missing",
    )
    assert checks["publisher mqtt"].ok
    fake.problem = None
    assert {c.name: c.ok for c in views.readiness_checks(as_view(fake))}["store"]


def test_the_dashboard_shows_the_quality_of_the_last_publish_tick() -> None:
    """One figure: what the publish cycle rated and told the plant, not a second
    computation at request time (before the first tick it is not rated yet)."""
    fake = FakeView()
    fake.add_frame(fake.clock - 5.0, (30, 10))
    state = views.daemon_state(as_view(fake), refresh_s=2.0)
    probe = state["probes"][0]
    assert probe["quality"] == "UNCERTAIN"
    fake.quality = "BAD"
    probe = views.daemon_state(as_view(fake), refresh_s=2.0)["probes"][0]
    assert probe["quality"] == "BAD"
    assert probe["last_frame_age_s"] == 5.0
    assert probe["snapshot"]["windows"]["60s"]["classes"]["PG"]["n"] == 10
    assert probe["source"] == {"alive": True, "detail": "watching"}


def test_recent_frames_come_from_the_view_newest_first() -> None:
    fake = FakeView(frames=[a_frame(20.0, "b.png"), a_frame(10.0, "a.png")])
    listing = views.frames_list(as_view(fake), "R1", boxes=False)
    assert [frame["key"] for frame in listing["frames"]] == ["b.png", "a.png"]
    assert listing["capacity"] == 8 and listing["frames"][0]["width"] == 64


def test_an_unknown_probe_is_refused_by_name() -> None:
    fake = FakeView()
    with pytest.raises(views.UnknownProbeError, match="R9"):
        views.frames_list(as_view(fake), "R9", boxes=False)
    with pytest.raises(views.UnknownProbeError, match="R9"):
        views.probe_state(as_view(fake), "R9", fake.counts)


def test_metrics_render_the_pipeline_load_the_view_reports() -> None:
    fake = FakeView()
    text = render_metrics(create_registry(as_view(fake))).decode()
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
    assert samples[("crystal_monitor_frame_queue_depth", ())] == 3
    assert samples[("crystal_monitor_frames_in_flight", ())] == 2
    assert samples[("crystal_monitor_batcher_queue_crops", ())] == 40
    assert samples[("crystal_monitor_frames_dropped_total", ())] == 1
    assert samples[("crystal_monitor_worker_processes", ())] == 2
    assert samples[("crystal_monitor_worker_restarts_total", ())] == 1
    assert samples[("crystal_monitor_worker_oversize_frames_total", ())] == 4
    assert samples[("crystal_monitor_inference_crops_total", ())] == 1200
    # Buckets are cumulative in Prometheus: 2, 2 + 5, 2 + 5 + 30, and all of them.
    buckets = [
        samples[("crystal_monitor_inference_batch_size_bucket", (("le", le),))]
        for le in ("1.0", "8.0", "32.0", "+Inf")
    ]
    assert buckets == [2, 7, 37, 37]
    assert samples[("crystal_monitor_inference_batch_size_sum", ())] == 1100.0
    assert samples[("crystal_monitor_store_writable", ())] == 1
    assert samples[("crystal_monitor_ready", ())] == 1
