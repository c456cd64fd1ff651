"""`crystal-monitor simulate OUTDIR`: write synthetic probe images with ground truth.

Crop mode writes an ImageFolder (OUTDIR/CEX/*.png, OUTDIR/PG/*.png) that the
model zoo trains on directly; frame mode writes full probe frames into OUTDIR,
optionally in real time (write-then-rename at a fixed rate) to stand in for a
live probe. Without --realtime the output is deterministic under --seed.

Looks and sites: without --look-mix or a site option the images are the classic
simulator's (what the shipped model was trained on). --look-mix slurry draws the
particle looks of a working slurry through per-site optics; --site, --sites and
--site-style choose the site(s). ground_truth.jsonl then records each image's
site and the look of each particle.

In frame mode each particle's ground truth also has its size and shape (area,
equivalent circle diameter, Feret max/min, aspect ratio) in pixels and, at
--pixel-size-um, in micrometres, and whether it touches another particle.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np

from monitor.simulator.crops import CropSimulator
from monitor.simulator.frames import SLURRY_PG_DIAMETER_PX, FrameConfig, FrameSimulator
from monitor.simulator.labels import CEX, LABELS, PG
from monitor.simulator.looks import LOOK_MIXES, SLURRY_MIX, look_names
from monitor.simulator.profiles import PROFILE_FORMS, ConstantProfile, PgProfile, parse_profile
from monitor.simulator.sites import (
    DEFAULT_TRAINING_SITES,
    Site,
    get_site_style,
    parse_site_range,
    site_style_names,
)
from monitor.simulator.writer import (
    FramePacer,
    GroundTruthLog,
    image_file_name,
    particle_records,
    write_png_atomically,
)

DEFAULT_START = datetime(2026, 1, 1, tzinfo=UTC)
# Micrometres per pixel of a typical probe: a Mettler-Toledo ParticleView V19 / PVM
# V819 images about 1075 x 825 um onto its 1360 x 1024 px sensor, 0.79 um/px.
DEFAULT_PIXEL_SIZE_UM = 0.8
DEFAULT_PG_FRACTION = {"crop": 0.5, "frame": 0.05}
# Options that only mean something for full frames.
FRAME_ONLY_OPTIONS = (
    "width",
    "height",
    "particles",
    "bubbles",
    "empty_share",
    "fouling",
    "density",
    "pixel_size_um",
)


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a number between 0 and 1, got {text!r}"
        ) from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


def _int_at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0.0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _site_range(text: str) -> range:
    try:
        return parse_site_range(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _site_style(text: str) -> Site:
    try:
        return get_site_style(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _profile(text: str) -> PgProfile:
    try:
        return parse_profile(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _timestamp(text: str) -> datetime:
    try:
        parsed = datetime.fromisoformat(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected an ISO 8601 time such as 2026-01-01T00:00:00Z, got {text!r}"
        ) from None
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)


def add_simulate_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the `simulate` options to a (sub)parser."""
    parser.add_argument("outdir", type=Path, help="folder to write images and ground_truth.jsonl")
    parser.add_argument(
        "--mode",
        choices=("crop", "frame"),
        default="frame",
        help="crop: single-particle crops in CEX/ and PG/ folders; frame: full probe frames "
        "(default: frame)",
    )
    parser.add_argument(
        "--count",
        type=_int_at_least(0),
        default=100,
        help="images to write; 0 with --realtime runs until interrupted (default: 100)",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    share = parser.add_mutually_exclusive_group()
    share.add_argument(
        "--pg-fraction",
        type=_fraction,
        default=None,
        help="constant PG share, 0..1 (default: 0.5 for crops, a balanced set; 0.05 for frames)",
    )
    share.add_argument(
        "--profile",
        type=_profile,
        default=None,
        help=f"PG share over time; one of {PROFILE_FORMS}",
    )
    parser.add_argument(
        "--width", type=_int_at_least(64), default=None, help="frame width px (1360)"
    )
    parser.add_argument(
        "--height", type=_int_at_least(64), default=None, help="frame height px (1024)"
    )
    parser.add_argument(
        "--particles", type=_int_at_least(0), default=None, help="particles per frame (default: 30)"
    )
    parser.add_argument(
        "--realtime",
        type=_positive_float,
        default=None,
        metavar="FPS",
        help="write at this rate in real time, each file written then renamed into place",
    )
    parser.add_argument(
        "--start",
        type=_timestamp,
        default=None,
        help="time of the first image, ISO 8601 (default: now with --realtime, "
        "else 2026-01-01T00:00:00Z so output is reproducible)",
    )
    parser.add_argument(
        "--interval",
        type=_positive_float,
        default=1.0,
        metavar="SECONDS",
        help="simulated seconds between images when not real time (default: 1.0)",
    )
    parser.add_argument("--bubbles", action="store_true", default=None, help="draw gas bubbles")
    parser.add_argument(
        "--empty-share",
        type=_fraction,
        default=None,
        help="share of frames with no particles at all (default: 0)",
    )
    parser.add_argument(
        "--fouling",
        action="store_true",
        default=None,
        help="a deposit on the probe window that grows over the first hour",
    )
    parser.add_argument(
        "--defocus-share",
        type=_fraction,
        default=0.2,
        help="share of particles out of focus (default: 0.2)",
    )
    parser.add_argument(
        "--look-mix",
        choices=tuple(LOOK_MIXES),
        default=None,
        help="particle looks: classic = the original granular PG and needle-bundle CEX "
        "(what the shipped model was trained on); slurry = a working slurry's looks "
        f"(PG: {', '.join(look_names('PG'))}; CEX: {', '.join(look_names('CEX'))}) seen "
        "through per-site optics. Default: classic, or each site's own mix when a site "
        "option is given. slurry without a site option: crops from sites "
        f"{DEFAULT_TRAINING_SITES.start}-{DEFAULT_TRAINING_SITES.stop - 1}, frames from "
        "the site drawn from --seed",
    )
    where = parser.add_mutually_exclusive_group()
    where.add_argument(
        "--site",
        type=_int_at_least(0),
        default=None,
        metavar="N",
        help="one site drawn from seed N: its optics (exposure, gamma, contrast, "
        "vignetting, noise, blur, 8/16-bit, JPEG, fouling) and its look mix",
    )
    where.add_argument(
        "--sites",
        type=_site_range,
        default=None,
        metavar="A-B",
        help="each image from one of the sites A..B (inclusive), e.g. 0-199 for training "
        "so that no single site's optics dominates",
    )
    where.add_argument(
        "--site-style",
        type=_site_style,
        default=None,
        metavar="NAME",
        help=f"a named site: one of {', '.join(site_style_names())}",
    )
    parser.add_argument(
        "--density",
        type=_fraction,
        default=None,
        help="frame mode: slurry density, 0 = sparse separate particles (default) .. "
        "1 = dense, needles cover most of the frame and particles touch and overlap",
    )
    parser.add_argument(
        "--pixel-size-um",
        type=_positive_float,
        default=None,
        metavar="UM",
        help="frame mode: micrometres per pixel, for the particle sizes in um in "
        f"ground_truth.jsonl (default: {DEFAULT_PIXEL_SIZE_UM}, a ParticleView V19's "
        "1075 x 825 um field on 1360 x 1024 px)",
    )


def _fail(message: str) -> int:
    print(f"crystal-monitor simulate: error: {message}", file=sys.stderr)
    return 2


def run_simulate(args: argparse.Namespace) -> int:
    """Write the images the options ask for; return the process exit code."""
    if args.count == 0 and args.realtime is None:
        return _fail("--count 0 (run until interrupted) needs --realtime FPS")
    if args.mode == "crop":
        for name in FRAME_ONLY_OPTIONS:
            if getattr(args, name) is not None:
                option = "--" + name.replace("_", "-")
                return _fail(f"{option} applies to --mode frame only")

    profile: PgProfile
    if args.profile is not None:
        profile = args.profile
    else:
        fraction = args.pg_fraction
        profile = ConstantProfile(DEFAULT_PG_FRACTION[args.mode] if fraction is None else fraction)

    outdir: Path = args.outdir
    try:
        outdir.mkdir(parents=True, exist_ok=True)
        if args.mode == "crop":
            for label in LABELS:
                (outdir / label).mkdir(exist_ok=True)
    except OSError as error:
        return _fail(f"cannot create output folder {outdir}: {error.strerror} (check OUTDIR)")

    realtime = args.realtime is not None
    start: datetime = args.start or (datetime.now(UTC) if realtime else DEFAULT_START)
    pacer = FramePacer(args.realtime) if realtime else None
    indices = itertools.count() if args.count == 0 else range(args.count)

    sites: Site | range | None = args.site_style or args.sites
    if args.site is not None:
        sites = range(args.site, args.site + 1)
    look_mix = args.look_mix
    slurry = sites is not None or look_mix == SLURRY_MIX.name

    frame_sim: FrameSimulator | None = None
    crop_sim: CropSimulator | None = None
    label_rng = np.random.default_rng(np.random.SeedSequence(args.seed).spawn(1)[0])
    if args.mode == "frame":
        config = FrameConfig(
            width=args.width or 1360,
            height=args.height or 1024,
            particles=30 if args.particles is None else args.particles,
            profile=profile,
            defocus_share=args.defocus_share,
            empty_share=args.empty_share or 0.0,
            bubbles=bool(args.bubbles),
            fouling=bool(args.fouling),
            density=args.density or 0.0,
            pg_diameter_px=SLURRY_PG_DIAMETER_PX if slurry else FrameConfig.pg_diameter_px,
        )
        frame_sim = FrameSimulator(config, seed=args.seed, look_mix=look_mix, sites=sites)
    else:
        crop_sim = CropSimulator(
            args.seed, defocus_share=args.defocus_share, look_mix=look_mix, sites=sites
        )

    written = 0
    counts = {CEX: 0, PG: 0}
    began = time.monotonic()
    pixel_size_um = args.pixel_size_um or DEFAULT_PIXEL_SIZE_UM
    with GroundTruthLog(outdir) as log:
        try:
            for index in indices:
                elapsed = pacer.wait(index) if pacer is not None else index * args.interval
                timestamp = start + timedelta(seconds=elapsed)
                pg_fraction = profile.fraction_at(elapsed)
                if frame_sim is not None:
                    image, truths = frame_sim.render(elapsed)
                    site = frame_sim.last_site
                    name = image_file_name(timestamp, index, prefix="frame")
                    write_png_atomically(outdir / name, image)
                    log.append(
                        name,
                        timestamp,
                        elapsed,
                        pg_fraction,
                        site=None if site is None else site.name,
                        pixel_size_um=pixel_size_um,
                        particles=particle_records(truths, pixel_size_um),
                    )
                    for truth in truths:
                        counts[truth.label] += 1
                elif crop_sim is not None:
                    label = PG if label_rng.random() < pg_fraction else CEX
                    name = f"{label}/{image_file_name(timestamp, index, prefix='crop')}"
                    crop, crop_truth = crop_sim.render_with_truth(label)
                    write_png_atomically(outdir / name, crop)
                    log.append(
                        name,
                        timestamp,
                        elapsed,
                        pg_fraction,
                        label=label,
                        look=crop_truth.look,
                        site=crop_truth.site,
                    )
                    counts[label] += 1
                written += 1
        except KeyboardInterrupt:
            pass

    total = counts[CEX] + counts[PG]
    share = counts[PG] / total if total else 0.0
    things = "particles" if args.mode == "frame" else "crops"
    print(
        f"wrote {written} {args.mode}s to {outdir} in {time.monotonic() - began:.1f} s: "
        f"{counts[PG]} PG of {total} {things} ({share:.1%}), profile {profile}"
    )
    return 0
