""" "I don't know": decisions with an out-of-distribution score, counted apart from every
class fraction, stored, and standing as the one diagnostic alarm while the probe sees
things the model was never trained on. Pure logic plus a real SQLite file."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from monitor.aggregate import FrameRecord, WindowAggregator
from monitor.alarms import AlarmEngine, AlarmState, OutOfDistributionAlarm, quality_of
from monitor.inference.decision import DecisionRule
from monitor.store import DB_FILE, FrameRow, Store
from tests.test_alarms import PROBE, T0, high, snapshot

CLASSES = ("CEX", "PG")


def ood_alarm(**overrides: Any) -> OutOfDistributionAlarm:
    fields: dict[str, Any] = {
        "kind": "out_of_distribution",
        "id": "not_crystals",
        "priority": "medium",
        "message": "{value:.0%} not crystals",
        "window": "60s",
        "limit": 0.2,
        "min_count": 50,
    }
    fields.update(overrides)
    return OutOfDistributionAlarm.model_validate(fields)


def with_ood(document: dict[str, Any], n_ood: int) -> dict[str, Any]:
    for window in document["windows"].values():
        particles = window["n"] + window["n_uncertain"] + n_ood
        window["n_ood"] = n_ood
        window["ood_share"] = n_ood / particles if particles else 0.0
    return document


def test_rule_rejects_far_scores_before_looking_at_confidence() -> None:
    rule = DecisionRule(CLASSES, uncertainty_threshold=0.6, ood_threshold=10.0)
    rows = np.array(
        [
            [0.99, 0.01, 3.0],  # confident and close: ok
            [0.55, 0.45, 3.0],  # close but unsure: low confidence
            [0.999, 0.001, 42.0],  # confident but far: out of distribution
            [0.02, 0.98, np.nan],  # a score that is not a number proves nothing
            [0.3, 0.7, 10.0],  # exactly at the threshold: still in distribution
        ],
        dtype=np.float32,
    )
    decisions = rule.decide(rows)
    assert [(d.label, d.status, d.reason) for d in decisions] == [
        ("CEX", "ok", None),
        ("CEX", "uncertain", "low_confidence"),
        ("CEX", "uncertain", "out_of_distribution"),
        ("PG", "uncertain", "out_of_distribution"),
        ("PG", "ok", None),
    ]
    assert decisions[2].ood_score == pytest.approx(42.0)
    assert rule.probabilities(rows).shape == (5, 2)


def test_rule_without_a_score_uses_confidence_only_and_refuses_a_mismatched_output() -> None:
    plain = DecisionRule(CLASSES, uncertainty_threshold=0.6)
    (decision,) = plain.decide(np.array([[0.1, 0.9]], np.float32))
    assert (decision.label, decision.status, decision.reason, decision.ood_score) == (
        "PG",
        "ok",
        None,
        None,
    )
    scored = DecisionRule(CLASSES, uncertainty_threshold=0.6, ood_threshold=5.0)
    with pytest.raises(ValueError, match=r"expected \(N, 3\).*re-export the model"):
        scored.decide(np.array([[0.1, 0.9]], np.float32))


def test_out_of_distribution_particles_are_in_no_class_fraction() -> None:
    aggregator = WindowAggregator(CLASSES, windows_s=(60.0,))
    aggregator.add(FrameRecord(ts=1.0, class_counts=(8, 2), n_uncertain=1, n_ood=9))
    window = aggregator.snapshot(2.0).to_json()["windows"]["60"]
    assert window["n"] == 10
    assert window["classes"]["PG"]["fraction"] == pytest.approx(0.2)
    assert (window["n_ood"], window["n_uncertain"]) == (9, 1)
    assert window["ood_share"] == pytest.approx(9 / 20)
    assert window["uncertain_share"] == pytest.approx(1 / 11)
    with pytest.raises(ValueError, match="n_ood=-1"):
        FrameRecord(ts=1.0, class_counts=(0, 0), n_ood=-1)
    with pytest.raises(ValueError, match="must carry no particles"):
        FrameRecord(ts=1.0, class_counts=(0, 0), n_ood=1, rejected_reason="blur")


def test_a_high_out_of_distribution_share_suppresses_process_alarms_and_stands_alone() -> None:
    engine = AlarmEngine([high(), ood_alarm()])
    (on,) = engine.evaluate(PROBE, with_ood(snapshot(0.2), 0), T0, last_frame_ts=T0)
    assert on.alarm_id == "pg_high"
    # The probe now sees mostly things that are not crystals: 600 of 1600 particles.
    blind = with_ood(snapshot(0.0), 600)
    transitions = engine.evaluate(PROBE, blind, T0 + 5, last_frame_ts=T0 + 5)
    assert [(t.alarm_id, t.to_state) for t in transitions] == [
        ("not_crystals", AlarmState.ACTIVE_UNACKNOWLEDGED)
    ]
    states = {s.alarm_id: s for s in engine.alarm_states(PROBE)}
    assert states["pg_high"].suppressed and states["pg_high"].value == 0.2
    assert states["not_crystals"].value == pytest.approx(600 / 1600)
    assert quality_of(blind, T0 + 5, T0 + 5, [ood_alarm()]) == "BAD"
    assert quality_of(with_ood(snapshot(0.0), 100), T0, T0, [ood_alarm()]) == "GOOD"
    # Too few particles to judge: uncertain input, never BAD on a handful.
    assert quality_of(with_ood(snapshot(0.0, n=10), 30), T0, T0, [ood_alarm()]) == "UNCERTAIN"


def test_store_keeps_out_of_distribution_counts_and_upgrades_an_old_file(tmp_path: Path) -> None:
    old = sqlite3.connect(tmp_path / DB_FILE)
    old.executescript(
        "CREATE TABLE frames (id INTEGER PRIMARY KEY, probe TEXT NOT NULL, key TEXT NOT NULL,"
        " ts REAL NOT NULL, batch TEXT, status TEXT NOT NULL, reason TEXT,"
        " counts TEXT NOT NULL, n_uncertain INTEGER NOT NULL, stored_at REAL NOT NULL,"
        " latency_s REAL);"
        "INSERT INTO frames VALUES (1, 'R1', 'old.png', 5.0, NULL, 'ok', NULL,"
        ' \'{"CEX": 3, "PG": 1}\', 2, 6.0, NULL);'
    )
    old.commit()
    old.close()
    readonly = Store(tmp_path, readonly=True)
    assert [row.n_ood for row in readonly.iter_frames()] == [0]
    readonly.close()

    store = Store(tmp_path)
    row = FrameRow("R1", "new.png", 7.0, None, "ok", None, {"CEX": 1, "PG": 0}, 0, 8.0, n_ood=4)
    assert store.record_frames([row]) == [True]
    assert [(r.key, r.n_ood, r.n_uncertain) for r in store.frames_since("R1", 0.0)] == [
        ("old.png", 0, 2),
        ("new.png", 4, 0),
    ]
    store.close()
