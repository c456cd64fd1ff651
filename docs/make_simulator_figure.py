"""Regenerate docs/simulator.png: real reference crops beside synthetic ones, and a frame.

Run from the repository root:

    .venv/bin/python docs/make_simulator_figure.py

The figure is how the simulator's realism is judged by eye: rows of real
OpenCrystalData crops (CEX needle bundles, PG agglomerates) beside synthetic
crops of every look (classic and slurry), and a dense slurry frame, downscaled.
Look crops are rendered at the "clean-8bit" site (first columns) and at drawn
sites (last columns), so the looks and the optics can be judged apart. Every tile is
scaled to fit the same box, as a classifier's preprocessing would, and carries
its original size.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import cv2
import numpy as np
import numpy.typing as npt

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from monitor.imaging.decode import to_grey_uint8  # noqa: E402
from monitor.simulator import (  # noqa: E402  (the repository root must be importable first)
    CEX,
    PG,
    ConstantProfile,
    CropSimulator,
    FrameConfig,
    FrameSimulator,
)
from monitor.simulator.frames import SLURRY_PG_DIAMETER_PX  # noqa: E402
from monitor.simulator.looks import get_look, look_names, single_look_mix  # noqa: E402
from monitor.simulator.sites import get_site_style  # noqa: E402

REFERENCE = Path("/work/shared/reference/opencrystaldata-cephalexin")
TILE = 180
GAP = 6
COLUMNS = 7
Image = npt.NDArray[np.uint8]


def put_label(image: Image, text: str, origin: tuple[int, int], scale: float = 0.5) -> None:
    """White text on a black box, legible on any grey."""
    font = cv2.FONT_HERSHEY_SIMPLEX
    (width, height), baseline = cv2.getTextSize(text, font, scale, 1)
    x, y = origin
    cv2.rectangle(image, (x - 3, y - height - 3), (x + width + 3, y + baseline), 0, -1)
    cv2.putText(image, text, origin, font, scale, 255, 1, cv2.LINE_AA)


def make_tile(crop: Image, label: str) -> Image:
    """The crop scaled to fit a TILE box (kept aspect), labelled, with its size."""
    height, width = crop.shape
    scale = TILE / max(height, width)
    resized = cv2.resize(
        crop, (round(width * scale), round(height * scale)), interpolation=cv2.INTER_AREA
    )
    tile = np.zeros((TILE, TILE), np.uint8)
    top, left = (TILE - resized.shape[0]) // 2, (TILE - resized.shape[1]) // 2
    tile[top : top + resized.shape[0], left : left + resized.shape[1]] = resized
    put_label(tile, label, (5, 17))
    put_label(tile, f"{width}x{height}", (5, TILE - 7), 0.4)
    return tile


def make_row(tiles: list[Image]) -> Image:
    """Tiles side by side with gaps, padded to COLUMNS tiles."""
    width = COLUMNS * TILE + (COLUMNS - 1) * GAP
    row = np.full((TILE, width), 40, np.uint8)
    for index, tile in enumerate(tiles[:COLUMNS]):
        x = index * (TILE + GAP)
        row[:, x : x + TILE] = tile
    return row


def load_reference(label: str) -> list[Image]:
    """The real crops of one class, as greyscale (they are stored as RGB)."""
    paths = sorted((REFERENCE / label).glob("*.png"))
    images = [cv2.imread(str(path), cv2.IMREAD_GRAYSCALE) for path in paths]
    return [image for image in images if image is not None]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "simulator.png")
    parser.add_argument("--seed", type=int, default=2026)
    args = parser.parse_args()

    rows: list[Image] = [
        make_row(
            [make_tile(c, f"real {label}") for label in (CEX, PG) for c in load_reference(label)]
        )
    ]
    clean = get_site_style("clean-8bit")
    for label in (CEX, PG):
        for look in look_names(label):
            mix = single_look_mix(look)
            at_clean = CropSimulator(args.seed, look_mix=mix, sites=clean, defocus_share=0.0)
            at_sites = CropSimulator(args.seed, look_mix=mix, sites=range(200))
            crops = [at_clean.render_with_truth(label) for _ in range(4)]
            crops += [at_sites.render_with_truth(label) for _ in range(COLUMNS - 4)]
            tiles = []
            for crop, truth in crops:
                assert get_look(truth.look).label == label
                tiles.append(make_tile(to_grey_uint8(crop), f"{label} {truth.look}"))
            rows.append(make_row(tiles))

    config = FrameConfig(
        profile=ConstantProfile(0.05), density=0.5, pg_diameter_px=SLURRY_PG_DIAMETER_PX
    )
    frames = FrameSimulator(config, seed=args.seed, sites=get_site_style("clean-8bit"))
    frame_any, truths = frames.render(0.0)
    frame = to_grey_uint8(frame_any)
    width = rows[0].shape[1]
    small = cv2.resize(
        frame, (width, round(frame.shape[0] * width / frame.shape[1])), interpolation=cv2.INTER_AREA
    )
    pg_count = sum(truth.label == PG for truth in truths)
    put_label(
        small,
        f"synthetic slurry frame {frame.shape[1]}x{frame.shape[0]} (downscaled), density 0.5: "
        f"{len(truths)} particles, {pg_count} PG",
        (8, 22),
        0.6,
    )
    rows.append(small)

    spacer = np.full((GAP, width), 40, np.uint8)
    figure = rows[0]
    for row in rows[1:]:
        figure = np.vstack((figure, spacer, row))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(args.out), figure):
        print(f"could not write {args.out}", file=sys.stderr)
        return 1
    print(f"wrote {args.out} ({figure.shape[1]}x{figure.shape[0]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
