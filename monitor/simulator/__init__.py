"""Probe simulator: synthetic in-situ crystallization images with ground truth.

Crop mode (`CropSimulator`) makes single-particle crops like the public
OpenCrystalData cephalexin set, for training; frame mode (`FrameSimulator`) makes
full probe frames with many particles and per-particle truth, for testing the
daemon end to end. Both use numpy and OpenCV only and are deterministic under a
seed.
"""

from monitor.simulator import profiles
from monitor.simulator.crops import CropSimulator
from monitor.simulator.frames import FrameConfig, FrameSimulator, ParticleTruth
from monitor.simulator.labels import CEX, LABELS, PG
from monitor.simulator.profiles import (
    ConstantProfile,
    PgProfile,
    RampProfile,
    StepProfile,
    parse_profile,
)
from monitor.simulator.writer import parse_frame_timestamp

__all__ = [
    "CEX",
    "LABELS",
    "PG",
    "ConstantProfile",
    "CropSimulator",
    "FrameConfig",
    "FrameSimulator",
    "ParticleTruth",
    "PgProfile",
    "RampProfile",
    "StepProfile",
    "parse_frame_timestamp",
    "parse_profile",
    "profiles",
]
