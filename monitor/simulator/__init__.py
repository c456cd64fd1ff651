"""Probe simulator: synthetic in-situ crystallization images with ground truth.

Crop mode (`CropSimulator`) makes single-particle crops like the public
OpenCrystalData cephalexin set, for training; frame mode (`FrameSimulator`) makes
full probe frames with many particles and per-particle truth, for testing the
daemon end to end. Both use numpy and OpenCV only and are deterministic under a
seed.
"""

from monitor.simulator import profiles
from monitor.simulator.crops import CropSimulator, CropTruth
from monitor.simulator.frames import FrameConfig, FrameSimulator, ParticleTruth
from monitor.simulator.labels import CEX, LABELS, PG
from monitor.simulator.looks import LOOK_MIXES, LookMix, get_look, look_names
from monitor.simulator.profiles import (
    ConstantProfile,
    PgProfile,
    RampProfile,
    StepProfile,
    parse_profile,
)
from monitor.simulator.sites import Site, SiteOptics, draw_site, get_site_style
from monitor.simulator.writer import parse_frame_timestamp

__all__ = [
    "CEX",
    "LABELS",
    "LOOK_MIXES",
    "PG",
    "ConstantProfile",
    "CropSimulator",
    "CropTruth",
    "FrameConfig",
    "FrameSimulator",
    "LookMix",
    "ParticleTruth",
    "PgProfile",
    "RampProfile",
    "Site",
    "SiteOptics",
    "StepProfile",
    "draw_site",
    "get_look",
    "get_site_style",
    "look_names",
    "parse_frame_timestamp",
    "parse_profile",
    "profiles",
]
