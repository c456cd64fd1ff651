"""The shipped model says "I don't know" to what is not a probe crop of a crystal.

Acceptance figures of the out-of-distribution check, through the daemon's own path
(decode-free preprocessing, ONNX Runtime, the manifest's decision rule): at least 95 %
of an out-of-distribution set of 268 images of eight kinds that no training run saw is
flagged, at most 1 % of fresh in-distribution simulator crops is, and none of the
seven real reference crops is.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Sequence

import numpy as np
import pytest

from monitor.cli.classify import classify_files, collect_image_files
from monitor.imaging.decode import to_grey_uint8
from monitor.imaging.preprocess import prepare_batch
from monitor.inference.backend import Backend
from monitor.inference.decision import Decision, DecisionRule
from monitor.inference.factory import resolve_backend
from monitor.manifest import LoadedModel, load_manifest
from monitor.simulator import CropSimulator
from tests.ood_images import build_ood_set
from tests.test_classify import REFERENCE

# Sites and seed never used for the shipped model's training (sites 0-199, seed 11).
IN_DISTRIBUTION_SEED = 4711


@pytest.fixture(scope="module")
def model() -> LoadedModel:
    return load_manifest()


@pytest.fixture(scope="module")
def backend(model: LoadedModel) -> Iterator[Backend]:
    backend = resolve_backend("onnxruntime", model)
    yield backend
    backend.close()


def decide_all(
    model: LoadedModel, backend: Backend, images: Sequence[np.ndarray]
) -> list[Decision]:
    rule = DecisionRule.from_manifest(model.manifest)
    decisions: list[Decision] = []
    for start in range(0, len(images), 64):
        batch = prepare_batch(images[start : start + 64], model.manifest.input)
        decisions += rule.decide(backend.infer(batch))
    return decisions


def test_shipped_model_carries_an_out_of_distribution_check(model: LoadedModel) -> None:
    manifest = model.manifest
    assert manifest.output == "probabilities+ood_score"
    assert manifest.ood is not None
    assert manifest.ood.target_false_reject_rate == pytest.approx(0.01)
    assert manifest.ood.validation_false_reject_rate <= 0.015


def test_at_least_95_percent_of_non_crystal_images_are_flagged(
    model: LoadedModel, backend: Backend
) -> None:
    ood_set = build_ood_set()
    assert len(ood_set) >= 200
    assert len({item.kind for item in ood_set}) >= 6
    decisions = decide_all(model, backend, [item.image for item in ood_set])
    flagged = [d.reason == "out_of_distribution" for d in decisions]
    missed = Counter(item.kind for item, hit in zip(ood_set, flagged, strict=True) if not hit)
    rate = sum(flagged) / len(flagged)
    print(f"flagged {sum(flagged)} of {len(flagged)} ({rate:.1%}); missed by kind {dict(missed)}")
    assert rate >= 0.95, missed


def test_at_most_1_percent_of_in_distribution_crops_are_flagged(
    model: LoadedModel, backend: Backend
) -> None:
    simulator = CropSimulator(IN_DISTRIBUTION_SEED, look_mix="slurry")
    labels = ["CEX", "PG"] * 300
    # 16-bit sites render uint16: convert as the daemon's decoder does.
    images = [to_grey_uint8(simulator.render(label)) for label in labels]
    decisions = decide_all(model, backend, images)
    flagged = sum(d.reason == "out_of_distribution" for d in decisions)
    print(f"in-distribution flagged: {flagged} of {len(decisions)}")
    assert flagged / len(decisions) <= 0.01


@pytest.mark.skipif(not REFERENCE.is_dir(), reason="shared/reference is beside the checkout only")
def test_no_real_reference_crop_is_flagged(model: LoadedModel, backend: Backend) -> None:
    files = list(collect_image_files([REFERENCE]))
    assert len(files) == 7
    results = list(classify_files(files, model, backend))
    for result in results:
        print(result.path, result.label, result.confidence, result.reason, result.ood_score)
    assert [r.reason for r in results if r.reason == "out_of_distribution"] == []
