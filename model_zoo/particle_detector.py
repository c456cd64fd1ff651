"""A learned particle detector for crowded frames, trained on the frame simulator.

In a dense slurry needle bundles lie across each other and across agglomerates: the
foreground is one mass that no threshold or distance-transform watershed can cut
(BENCHMARKS.md, "instances": recall 0.05 dense). A detector that looks at the whole
frame learns what one bundle or one agglomerate looks like and where it ends.

The model is a small CenterNet (Zhou et al. 2019, "Objects as Points"): a
fully-convolutional network over the frame at a quarter of its size predicts, on a
grid of 8 x 8 frame pixels, a heat map of particle centres, the offset of a centre
within its cell and the box's log width and height. Class is left to the classifier,
which sees each particle's crop as in every other sampling mode. Only in-focus
particles are targets: out-of-focus ones are what `particles.min_focus` drops.

Training frames come from `monitor.simulator.FrameSimulator` at densities from sparse
to dense, with seeds that bench/instances.py and the tests do not use. The export is
an ONNX file with a small JSON manifest (`detector.json`) that
`monitor.inference.particle_detector` reads; torch is never needed to run it.

    python -m model_zoo train-detector OUT_DIR [--frames 1600] [--steps 3000] [--init DIR]
"""

from __future__ import annotations

import json
import math
import time
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812 (the conventional alias)

from model_zoo.errors import ModelZooError
from monitor.inference.particle_detector import (
    GRID,
    INPUT_MEAN,
    INPUT_SCALE,
    INPUT_SCALE_GREY,
    OUTPUT_CHANNELS,
    network_input,
)
from monitor.manifest import DETECTOR_MANIFEST
from monitor.simulator import ConstantProfile, FrameConfig, FrameSimulator

# Seeds of training frames start here: bench/instances.py renders seed 15, the tests
# seeds below 1,000.
TRAIN_SEED_BASE = 100_000
FRAMES_PER_SIMULATOR = 4
CROP = (
    128,
    160,
)  # training crop of the network input (rows, columns), multiples of GRID/INPUT_SCALE
CHECKPOINT_FILE = "detector.pt"  # the weights, for --init; the daemon reads the ONNX file
HEAT_BIAS = -2.19  # sigmoid(-2.19) = 0.1: CenterNet's prior for the heat map's first steps


def _conv(inputs: int, outputs: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(inputs, outputs, 3, stride, padding=dilation, dilation=dilation, bias=False),
        nn.BatchNorm2d(outputs),
        nn.ReLU(inplace=True),
    )


class CentreNet(nn.Module):
    """Input (N, 1, H, W) at a quarter of the frame; output (N, 5, H/2, W/2) on the
    8 px grid: heat-map logit, centre offset x and y within the cell, log box width and
    height in cells.

    Stride-2 stages reach 8, 16 and 32 frame pixels; the last, with dilated
    convolutions, sees about 300 frame pixels around each cell (a long bundle end to
    end) and is added back at 16 px. The head predicts each 16 px cell's four 8 px
    cells (depth to space): on a 16 px grid a quarter of a dense slurry's particles
    have another's centre in a neighbouring cell, where one of the two peaks is lost,
    and a head at 8 px would cost four times as much."""

    def __init__(self, widths: tuple[int, int, int] = (16, 32, 64)) -> None:
        super().__init__()
        small, middle, wide = widths
        self.stem = nn.Sequential(_conv(1, small, 2), _conv(small, small))
        self.grid = nn.Sequential(_conv(small, middle, 2), _conv(middle, middle))
        self.context = nn.Sequential(
            _conv(middle, wide, 2),
            _conv(wide, wide),
            _conv(wide, wide, dilation=2),
            _conv(wide, wide, dilation=4),
        )
        self.lateral = nn.Conv2d(middle, wide, 1)
        self.fuse = _conv(wide, middle)
        self.head = nn.Sequential(
            _conv(middle, middle),
            nn.Conv2d(middle, 4 * OUTPUT_CHANNELS, 1),
            nn.PixelShuffle(2),
        )
        last = self.head[1]
        assert isinstance(last, nn.Conv2d) and last.bias is not None
        nn.init.constant_(last.bias[0:4], HEAT_BIAS)  # channel c of cell k is c*4 + k

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        grid = self.grid(self.stem(frames))
        context = self.context(grid)
        context = F.interpolate(context, size=grid.shape[-2:], mode="bilinear", align_corners=False)
        return self.head(self.fuse(context + self.lateral(grid)))


@dataclass(frozen=True)
class TrainingFrame:
    """One rendered frame as the network sees it and its targets on the grid."""

    image: np.ndarray  # uint8 (H/4, W/4)
    boxes: np.ndarray  # float32 (n, 4): x, y, w, h in frame px of in-focus particles


def render_frames(
    count: int, seed: int, width: int = 1360, height: int = 1024
) -> list[TrainingFrame]:
    """`count` simulated frames: density, PG share, bubbles and fouling drawn per
    simulator from `seed`, FRAMES_PER_SIMULATOR frames of each at random times."""
    rng = np.random.default_rng(seed)
    frames: list[TrainingFrame] = []
    while len(frames) < count:
        config = FrameConfig(
            width=width,
            height=height,
            density=float(rng.choice([0.0, rng.uniform(0.0, 1.0), 1.0], p=[0.15, 0.45, 0.4])),
            profile=ConstantProfile(float(rng.uniform(0.0, 0.5))),
            bubbles=bool(rng.random() < 0.2),
            fouling=bool(rng.random() < 0.2),
        )
        simulator = FrameSimulator(config, seed=int(rng.integers(TRAIN_SEED_BASE, 2**31)))
        for _ in range(min(FRAMES_PER_SIMULATOR, count - len(frames))):
            image, truths = simulator.render(float(rng.uniform(0.0, 3600.0)))
            boxes = np.array([t.bbox for t in truths if t.in_focus], np.float32).reshape(-1, 4)
            frames.append(TrainingFrame(network_input(image), boxes))
    return frames


def render_frames_parallel(count: int, seed: int, workers: int) -> list[TrainingFrame]:
    """render_frames over `workers` processes, each with its own seed."""
    shares = [count // workers + (i < count % workers) for i in range(workers)]
    with ProcessPoolExecutor(workers) as pool:
        parts = pool.map(render_frames, shares, [seed * 1000 + i for i in range(workers)])
        return [frame for part in parts for frame in part]


def targets(boxes: np.ndarray, grid_shape: tuple[int, int]) -> np.ndarray:
    """(6, rows, columns) float32: heat map (a Gaussian per centre, sigma a sixth of
    the box's geometric-mean side, at least 0.7 cells), offset x, y, log w, log h at
    each centre's cell, and a 0/1 channel marking those cells."""
    rows, columns = grid_shape
    out = np.zeros((6, rows, columns), np.float32)
    ys, xs = np.mgrid[0:rows, 0:columns].astype(np.float32)
    for x, y, w, h in boxes:
        cx, cy = (x + w / 2.0) / GRID, (y + h / 2.0) / GRID
        cell_x, cell_y = int(cx), int(cy)
        if not (0 <= cell_x < columns and 0 <= cell_y < rows):
            continue
        sigma = max(0.7, math.sqrt(w * h) / GRID / 6.0)
        bump = np.exp(-((xs - cell_x) ** 2 + (ys - cell_y) ** 2) / (2.0 * sigma * sigma))
        np.maximum(out[0], bump, out=out[0])
        out[1:6, cell_y, cell_x] = (
            cx - cell_x,
            cy - cell_y,
            math.log(max(w, 1.0) / GRID),
            math.log(max(h, 1.0) / GRID),
            1.0,
        )
    return out


def detection_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """CenterNet's penalty-reduced focal loss on the heat map plus L1 on offsets and
    log sizes at the centres, each normalised by the number of centres."""
    heat = torch.sigmoid(output[:, 0]).clamp(1e-4, 1 - 1e-4)
    truth = target[:, 0]
    centre = target[:, 5]
    positive = torch.log(heat) * (1 - heat) ** 2 * centre
    negative = torch.log(1 - heat) * heat**2 * (1 - truth) ** 4 * (1 - centre)
    count = centre.sum().clamp(min=1.0)
    focal = -(positive.sum() + negative.sum()) / count
    regression = (
        F.l1_loss(output[:, 1:5], target[:, 1:5], reduction="none") * centre[:, None]
    ).sum()
    return focal + regression / count


class FrameBatches:
    """Random crops (CROP, flipped at random, brightness and contrast jittered) of the
    training frames with their targets, as tensors."""

    def __init__(self, frames: Sequence[TrainingFrame], seed: int) -> None:
        self._frames = frames
        self._rng = np.random.default_rng(seed)
        self._targets = [
            targets(
                f.boxes,
                (f.image.shape[0] * INPUT_SCALE // GRID, f.image.shape[1] * INPUT_SCALE // GRID),
            )
            for f in frames
        ]

    def batch(self, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = self._rng
        step = GRID // INPUT_SCALE
        images, maps = [], []
        for index in rng.integers(0, len(self._frames), size):
            image, target = self._frames[index].image, self._targets[index]
            top = int(rng.integers(0, (image.shape[0] - CROP[0]) // step + 1)) * step
            left = int(rng.integers(0, (image.shape[1] - CROP[1]) // step + 1)) * step
            crop = image[top : top + CROP[0], left : left + CROP[1]].astype(np.float32)
            cell = target[
                :, top // step : (top + CROP[0]) // step, left // step : (left + CROP[1]) // step
            ].copy()
            crop = crop * rng.uniform(0.8, 1.2) + rng.uniform(-15.0, 15.0)
            if rng.random() < 0.5:  # mirror left-right: offset x mirrors too
                crop, cell = crop[:, ::-1], cell[:, :, ::-1]
                cell[1] = np.where(cell[5] > 0, 1.0 - cell[1], 0.0)
            if rng.random() < 0.5:
                crop, cell = crop[::-1, :], cell[:, ::-1, :]
                cell[2] = np.where(cell[5] > 0, 1.0 - cell[2], 0.0)
            images.append(np.clip(crop, 0, 255)[None])
            maps.append(cell)
        batch = (np.stack(images) - INPUT_MEAN) / INPUT_SCALE_GREY  # as the daemon feeds it
        return torch.from_numpy(batch.astype(np.float32)), torch.from_numpy(
            np.ascontiguousarray(np.stack(maps))
        )


@dataclass(frozen=True)
class DetectorTrainOptions:
    frames: int = 1600
    steps: int = 3000
    batch_size: int = 16
    learning_rate: float = 2e-3
    seed: int = 0
    workers: int = 2
    init: Path | None = None  # a detector folder with detector.pt: fine-tune it


def train_detector(
    options: DetectorTrainOptions,
    frames: Sequence[TrainingFrame] | None = None,
    progress: Callable[[str], None] = print,
) -> CentreNet:
    """Render (unless given) the training frames and train a CentreNet on them."""
    torch.manual_seed(options.seed)
    if frames is None:
        started = time.monotonic()
        frames = render_frames_parallel(options.frames, options.seed, options.workers)
        progress(f"rendered {len(frames)} frames in {time.monotonic() - started:.0f} s")
    model = CentreNet()
    if options.init is not None:
        checkpoint = options.init / CHECKPOINT_FILE
        if not checkpoint.is_file():
            raise ModelZooError(f"--init {options.init}: no {CHECKPOINT_FILE} there")
        model.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=True))
    optimiser = torch.optim.AdamW(model.parameters(), lr=options.learning_rate, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimiser, options.learning_rate, total_steps=options.steps, pct_start=0.1
    )
    batches = FrameBatches(frames, options.seed)
    model.train()
    started = time.monotonic()
    running = 0.0
    for step in range(1, options.steps + 1):
        images, target = batches.batch(options.batch_size)
        loss = detection_loss(model(images), target)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        schedule.step()
        running = loss.item() if step == 1 else 0.98 * running + 0.02 * loss.item()
        if step % 100 == 0 or step == options.steps:
            elapsed = time.monotonic() - started
            progress(f"step {step}/{options.steps} loss {running:.3f} ({elapsed:.0f} s)")
    return model.eval()


def export_detector(
    model: CentreNet, out_dir: Path, notes: dict[str, object] | None = None
) -> Path:
    """Write OUT_DIR/detector.onnx, detector.pt (for --init) and detector.json; returns
    the manifest path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    onnx_path = out_dir / "detector.onnx"
    example = torch.zeros(1, 1, 256, 340)
    with warnings.catch_warnings():
        # The legacy exporter on purpose (as model_zoo/export.py); its notice is known.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model,
            (example,),
            str(onnx_path),
            input_names=["frame"],
            output_names=["grid"],
            dynamic_axes={
                "frame": {0: "batch", 2: "height", 3: "width"},
                "grid": {0: "batch", 2: "rows", 3: "columns"},
            },
            opset_version=17,
            dynamo=False,
        )
    torch.save(model.state_dict(), out_dir / CHECKPOINT_FILE)
    manifest = {
        "schema_version": 1,
        "kind": "centrenet",
        "onnx_file": onnx_path.name,
        "input_scale": INPUT_SCALE,
        "grid": GRID,
        **(notes or {}),
    }
    path = out_dir / DETECTOR_MANIFEST
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    return path
