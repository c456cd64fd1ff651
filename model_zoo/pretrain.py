"""Self-supervised pretraining of a classifier's encoder on unlabelled crops (SimCLR).

A plant has thousands of unlabelled crops an hour and few labelled ones. SimCLR
(Chen et al. 2020) trains the encoder without labels: two random views of each crop
(`model_zoo.simclr_views`) go through the encoder and a small projection head, and
the NT-Xent loss pulls each view towards its twin and away from the other 2N - 2
views of the batch; no memory bank, the batch is the set of negatives. The
projection head is dropped at the end, and the encoder (the registry's network
without its classifier head, so its state_dict keys are those `train` builds) is
fine-tuned on the few labels with `train --init RUN`.

A run directory holds:

* `args.json`: the resolved options, the exact command, the number and a digest of
  the images, the input spec (size, resize, mean/std) the encoder learned on;
* `metrics.csv`: one row per epoch (loss, positive-pair top-1, learning rate, time);
* `checkpoint.pt`: the state after the last finished epoch (encoder, projection head,
  optimiser, schedule, random state), written atomically every epoch;
* `encoder.pt`: the encoder's state_dict, written when the last epoch is done.

Running the same command again on an unfinished run resumes it after its last
finished epoch; other arguments are refused unless --overwrite. Only tensors and
plain values are saved, so `torch.load(weights_only=True)` opens every file.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import shlex
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import torch
import torchvision
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from model_zoo.checkpoint import (
    ARGS_FILE,
    CHECKPOINT_FILE,
    ENCODER_FILE,
    PRETRAIN_KIND,
    extract_state_dict,
    save_state_dict,
)
from model_zoo.errors import ModelZooError
from model_zoo.imagefolder import DatasetError, LabelledFile, load_images
from model_zoo.ood import split_head
from model_zoo.registry import (
    create_model,
    imagenet_source,
    input_normalisation,
    load_imagenet_weights,
)
from model_zoo.simclr_views import SimCLRViewConfig, ViewPairs
from model_zoo.training import EpochProgress, resolve_device, seed_everything
from monitor.imaging.decode import IMAGE_SUFFIXES
from monitor.manifest import InputSpec, sha256_of_file

METRICS_FILE = "metrics.csv"
RUN_FILES = (ARGS_FILE, METRICS_FILE, CHECKPOINT_FILE, ENCODER_FILE)
METRICS_COLUMNS = ("epoch", "loss", "positive_top1", "lr", "seconds", "images_per_s")
# Two runs with equal values of these are the same run: a second start resumes the first.
# Threads, workers and device change the speed, not the run.
RUN_IDENTITY_KEYS = (
    "kind",
    "method",
    "data_dir",
    "images",
    "files_sha256",
    "arch",
    "init",
    "init_weights_sha256",
    "input_size",
    "resize",
    "epochs",
    "batch_size",
    "lr",
    "weight_decay",
    "temperature",
    "projection_dim",
    "seed",
)
# Pretraining needs negatives in every batch: the smallest batch that has some.
MIN_BATCH_SIZE = 4
# The classifier head's class count while pretraining: the head is dropped, any count
# builds the same encoder.
_HEAD_CLASSES = 2

Method = Literal["simclr"]


@dataclass(frozen=True)
class PretrainOptions:
    """Everything that defines a pretraining run; saved to args.json as resolved.

    temperature: NT-Xent's. 0.5 by default, not the 0.1 of SimCLR's ImageNet runs: a
    low temperature weights the hardest negatives most, and in a batch of particle
    crops the hardest negatives are other crops of the same class, often of the same
    look, which a low temperature pushes apart as hard as crops of the other class,
    spoiling the class structure the fine-tuning needs (Wang & Liu 2021); Chen et al.
    found 0.5 best for their small-batch (CIFAR-10) runs, which batches of 64-256 on
    a plant's CPU resemble.
    """

    data_dir: Path
    out_dir: Path
    method: Method = "simclr"
    arch: str = "efficientnet_lite0"
    init: Literal["scratch", "imagenet"] = "scratch"
    input_size: int = 96
    resize: Literal["letterbox", "stretch"] = "letterbox"
    epochs: int = 30
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 1e-4
    temperature: float = 0.5
    projection_dim: int = 128
    seed: int = 0
    workers: int = 0
    threads: int = 0  # 0 = all cores
    device: str = "auto"
    resume: bool = False
    overwrite: bool = False
    command: str = field(default="", compare=False)


@dataclass(frozen=True)
class PretrainResult:
    run_dir: Path
    encoder_file: Path
    epochs_run: int
    resumed_from: int
    """The last epoch already done when this call started (0: a fresh run)."""
    final_loss: float


def nt_xent_loss(first: torch.Tensor, second: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's normalised-temperature cross entropy over N positive pairs.

    Row i of `first` and row i of `second` are two views of one image. All 2N
    projections are L2-normalised; each one's logits are its cosine similarities to
    the other 2N - 1 divided by the temperature, its target is its twin, and the loss
    is the mean cross entropy over all 2N.
    """
    if first.shape != second.shape or first.ndim != 2 or first.shape[0] < 1:
        raise ValueError(
            f"need two (N, D) batches of equal shape, got {tuple(first.shape)} and "
            f"{tuple(second.shape)}"
        )
    count = first.shape[0]
    projections = nn.functional.normalize(torch.cat((first, second)), dim=1)
    logits = projections @ projections.T / temperature
    # A view is never its own negative.
    logits = logits.masked_fill(
        torch.eye(2 * count, dtype=torch.bool, device=logits.device), -math.inf
    )
    targets = torch.arange(2 * count, device=logits.device).roll(count)
    return nn.functional.cross_entropy(logits, targets)


def positive_top1(first: torch.Tensor, second: torch.Tensor) -> float:
    """Share of the 2N views whose most similar other view is their twin."""
    count = first.shape[0]
    projections = nn.functional.normalize(torch.cat((first, second)), dim=1)
    similarity = projections @ projections.T
    similarity.fill_diagonal_(-math.inf)
    targets = torch.arange(2 * count, device=similarity.device).roll(count)
    return float((similarity.argmax(1) == targets).float().mean())


class ContrastiveNetwork(nn.Module):
    """The registry's network with its classifier head swapped for a projection head.

    `encoder` is `create_model(arch, ...)` with its last Linear replaced by an
    identity (so `encoder.state_dict()` has exactly the keys `train` loads, less the
    head); `projection` is SimCLR's MLP (Linear, batch norm, ReLU, Linear), which
    makes the contrastive loss act on a space the representation need not match.
    """

    def __init__(self, network: nn.Module, projection_dim: int) -> None:
        super().__init__()
        self.encoder, head = split_head(network)
        width = head.in_features
        self.feature_dim = width
        self.projection = nn.Sequential(
            nn.Linear(width, width, bias=False),
            nn.BatchNorm1d(width),
            nn.ReLU(inplace=True),
            nn.Linear(width, projection_dim),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        projected: torch.Tensor = self.projection(self.encoder(images))
        return projected


def list_unlabelled_files(folder: Path) -> list[LabelledFile]:
    """Every image under `folder`, recursively, in path order; hidden files and folders
    are skipped. Class folders (a sample-store export's, `_not_a_particle` included)
    are just more images here: pretraining reads no labels."""
    if not folder.is_dir():
        raise DatasetError(f"image folder not found: {folder}")
    files = [
        # Unlabelled: the label field is unused.
        LabelledFile(path, -1)
        for path in sorted(folder.rglob("*"))
        if path.suffix.lower() in IMAGE_SUFFIXES
        and path.is_file()
        and not any(part.startswith(".") for part in path.relative_to(folder).parts)
    ]
    if len(files) < 2:
        raise DatasetError(
            f"{folder} holds {len(files)} image(s) ({', '.join(sorted(IMAGE_SUFFIXES))}); "
            "contrastive pretraining needs at least 2 (point at the folder of crops, e.g. "
            "a `crystal-monitor samples export`)"
        )
    return files


def pretrain_model(options: PretrainOptions) -> PretrainResult:
    """Pretrain (or resume pretraining) and write the run directory."""
    _check_options(options)
    device = resolve_device(options.device)
    files = list_unlabelled_files(options.data_dir)
    init_file = imagenet_source(options.arch).locate() if options.init == "imagenet" else None
    mean, std = input_normalisation(options.arch)
    spec = InputSpec(size=options.input_size, resize=options.resize, mean=mean, std=std)
    threads = options.threads or os.cpu_count() or 1
    described = _describe_run(
        options, files=files, spec=spec, threads=threads, device=device, init_file=init_file
    )
    run_dir = options.out_dir
    done = _prepare_run_dir(run_dir, described, options)

    torch.set_num_threads(threads)
    seed_everything(options.seed)
    loaded = load_images(files, threads=threads, description="decode")
    for path, reason in loaded.unreadable:
        print(f"skipped unreadable image {path}: {reason}", file=sys.stderr)
    if len(loaded.images) < 2:
        raise DatasetError(
            f"only {len(loaded.images)} of the {len(files)} images under {options.data_dir} "
            "could be read; contrastive pretraining needs at least 2"
        )
    network = create_model(options.arch, _HEAD_CLASSES)
    if options.init == "imagenet":
        load_imagenet_weights(network, options.arch)
    model = ContrastiveNetwork(network, options.projection_dim).to(device)
    print(
        f"{options.method} on {len(loaded.images)} images of {options.data_dir}; "
        f"{options.arch} ({options.init}) at {spec.size} px on {device} with {threads} "
        f"threads; temperature {options.temperature}, batch {options.batch_size}",
        file=sys.stderr,
    )

    dataset = ViewPairs(loaded.images, spec, seed=options.seed, config=SimCLRViewConfig())
    generator = torch.Generator()
    loader = DataLoader(
        dataset,
        batch_size=options.batch_size,
        shuffle=True,
        num_workers=options.workers,
        # A last batch of one crop has no negatives and breaks batch norm.
        drop_last=len(dataset) > options.batch_size,
        generator=generator,
    )
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=options.lr, weight_decay=options.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, T_max=max(1, options.epochs * len(loader)), eta_min=options.lr * 0.01
    )
    if done:
        _restore_state(run_dir / CHECKPOINT_FILE, model, optimizer, scheduler, done)
        tqdm.write(f"resuming {run_dir} after epoch {done} of {options.epochs}", file=sys.stderr)

    loss = math.nan
    for epoch in range(done + 1, options.epochs + 1):
        dataset.epoch = epoch
        # The shuffle of each epoch follows from (seed, epoch) alone, as the views do,
        # so a resumed run trains on the batches the interrupted one would have.
        generator.manual_seed(options.seed * 1_000_003 + epoch)
        row = _train_one_epoch(
            model,
            loader,
            optimizer,
            scheduler,
            temperature=options.temperature,
            device=device,
            description=f"epoch {epoch}/{options.epochs}",
        )
        row["epoch"] = epoch
        loss = row["loss"]
        _append_metrics_row(run_dir / METRICS_FILE, row)
        _save_state(run_dir / CHECKPOINT_FILE, model, optimizer, scheduler, epoch)
        tqdm.write(
            f"epoch {epoch}: loss {row['loss']:.4f}, positive top-1 {row['positive_top1']:.3f}, "
            f"lr {row['lr']:.2e}, {row['seconds']:.1f} s, {row['images_per_s']:.0f} img/s",
            file=sys.stderr,
        )
    encoder_file = run_dir / ENCODER_FILE
    save_state_dict(extract_state_dict(model.encoder), encoder_file)
    return PretrainResult(
        run_dir=run_dir,
        encoder_file=encoder_file,
        epochs_run=options.epochs,
        resumed_from=done,
        final_loss=loss,
    )


def _train_one_epoch(
    model: ContrastiveNetwork,
    loader: DataLoader[tuple[torch.Tensor, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    *,
    temperature: float,
    device: torch.device,
    description: str,
) -> dict[str, float]:
    model.train()
    total_loss = total_top1 = 0.0
    total_images = 0
    lr = optimizer.param_groups[0]["lr"]
    started = time.perf_counter()
    progress = EpochProgress(len(loader), description)
    for first_views, second_views in loader:
        count = len(first_views)
        # One forward over both views: batch norm sees all 2N, so no view pair shares
        # statistics the others lack (the "shuffled BN" concern of MoCo does not arise).
        views = torch.cat((first_views, second_views)).to(device, non_blocking=True)
        optimizer.zero_grad(set_to_none=True)
        projected = model(views)
        first, second = projected[:count], projected[count:]
        loss = nt_xent_loss(first, second, temperature)
        loss.backward()
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
        loss_value = float(loss.detach())
        total_loss += loss_value * count
        total_top1 += positive_top1(first.detach(), second.detach()) * count
        total_images += count
        progress.update(loss_value)
    progress.close()
    seconds = time.perf_counter() - started
    return {
        "loss": total_loss / max(1, total_images),
        "positive_top1": total_top1 / max(1, total_images),
        "lr": lr,
        "seconds": seconds,
        "images_per_s": total_images / seconds,
    }


def _save_state(
    path: Path,
    model: ContrastiveNetwork,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    epoch: int,
) -> None:
    """Everything a resume needs, atomically: a crash never leaves half a checkpoint."""
    state = {
        "epoch": epoch,
        "model": extract_state_dict(model),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "torch_rng": torch.get_rng_state(),
    }
    partial = path.with_name(path.name + ".partial")
    torch.save(state, partial)
    partial.replace(path)


def _read_state(path: Path) -> dict[str, Any]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelZooError(
            f"cannot read the pretraining state {path} ({exc}); pass --overwrite to start "
            "the run again"
        ) from exc
    if not isinstance(state, dict) or not isinstance(state.get("epoch"), int):
        raise ModelZooError(
            f"{path} is not a pretraining state; pass --overwrite to start the run again"
        )
    return state


def _restore_state(
    path: Path,
    model: ContrastiveNetwork,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    epoch: int,
) -> None:
    state = _read_state(path)
    if state["epoch"] != epoch:
        raise ModelZooError(f"{path} changed while resuming; run the command again")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])


def _prepare_run_dir(run_dir: Path, described: Mapping[str, Any], options: PretrainOptions) -> int:
    """Make `run_dir` ready; return the last epoch already done (0 for a fresh run).

    A directory holding an unfinished run of the same arguments resumes; one holding
    another run, or a finished one, is refused naming the fix, unless --overwrite.
    """
    existing = [name for name in RUN_FILES if (run_dir / name).exists()]
    if options.overwrite or not existing:
        if options.resume and not existing:
            raise ModelZooError(
                f"--resume: {run_dir} holds no pretrain run to resume; drop --resume to start one"
            )
        run_dir.mkdir(parents=True, exist_ok=True)
        for name in existing:
            (run_dir / name).unlink()
        _write_json(run_dir / ARGS_FILE, described)
        return 0
    try:
        recorded = json.loads((run_dir / ARGS_FILE).read_text())
    except (OSError, ValueError):
        recorded = {}
    if recorded.get("kind") != PRETRAIN_KIND:
        raise ModelZooError(
            f"{run_dir} already holds files ({', '.join(existing)}) that are not a pretrain "
            "run; choose another --out or pass --overwrite"
        )
    differences = [
        f"{key} {recorded.get(key)!r} -> {described.get(key)!r}"
        for key in RUN_IDENTITY_KEYS
        if recorded.get(key) != described.get(key)
    ]
    if differences:
        raise ModelZooError(
            f"{run_dir} holds a pretrain run with other arguments ({'; '.join(differences)}); "
            "give its arguments to resume it, or choose another --out, or pass --overwrite "
            "to start again"
        )
    state_file = run_dir / CHECKPOINT_FILE
    done = int(_read_state(state_file)["epoch"]) if state_file.exists() else 0
    if done >= options.epochs and (run_dir / ENCODER_FILE).exists():
        raise ModelZooError(
            f"{run_dir} holds a finished pretrain run ({done} epochs, {ENCODER_FILE}); "
            f"fine-tune from it with `python -m model_zoo train DATA_DIR --init {run_dir} "
            f"--arch {options.arch}`, or pass --overwrite to pretrain again"
        )
    if options.resume and not done:
        raise ModelZooError(
            f"--resume: {run_dir} has no finished epoch to resume from; drop --resume to start it"
        )
    _keep_metrics_rows(run_dir / METRICS_FILE, done)
    # Keep the original record, with the command and time of this start added.
    starts = [
        *recorded.get("resumed", []),
        {
            "after_epoch": done,
            "command": options.command,
            "at": datetime.now(UTC).isoformat(timespec="seconds"),
        },
    ]
    _write_json(run_dir / ARGS_FILE, {**recorded, "resumed": starts})
    return done


def _keep_metrics_rows(path: Path, last_epoch: int) -> None:
    """Drop rows of epochs after the last saved state (written before a crash)."""
    if not path.exists():
        return
    with path.open(newline="") as stream:
        rows = [row for row in csv.DictReader(stream) if int(row["epoch"]) <= last_epoch]
    with path.open("w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=METRICS_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def _check_options(options: PretrainOptions) -> None:
    problems = []
    if options.method != "simclr":
        problems.append(f"--method {options.method}: only simclr is implemented")
    if options.epochs < 1:
        problems.append("--epochs must be >= 1")
    if options.batch_size < MIN_BATCH_SIZE:
        problems.append(
            f"--batch-size must be >= {MIN_BATCH_SIZE} (the other crops of a batch are the "
            "negatives; SimCLR wants as many as memory allows)"
        )
    if not 0 < options.temperature <= 10:
        problems.append("--temperature must be in (0, 10]")
    if options.lr <= 0:
        problems.append("--lr must be > 0")
    if options.projection_dim < 2:
        problems.append("--projection-dim must be >= 2")
    if options.workers < 0 or options.threads < 0:
        problems.append("--workers and --threads must be >= 0")
    if options.init == "imagenet":
        imagenet_source(options.arch)  # raises naming the architectures that have one
    if problems:
        raise ModelZooError("; ".join(problems))


def _describe_run(
    options: PretrainOptions,
    *,
    files: Sequence[LabelledFile],
    spec: InputSpec,
    threads: int,
    device: torch.device,
    init_file: Path | None,
) -> dict[str, object]:
    resolved: dict[str, object] = asdict(options)
    names = "\n".join(str(item.path.relative_to(options.data_dir)) for item in files)
    resolved.update(
        kind=PRETRAIN_KIND,
        data_dir=str(options.data_dir.resolve()),
        out_dir=str(options.out_dir.resolve()),
        images=len(files),
        # The file list's digest: a folder that gained or lost images is another run.
        files_sha256=hashlib.sha256(names.encode()).hexdigest(),
        init_weights=str(init_file.resolve()) if init_file else None,
        init_weights_sha256=sha256_of_file(init_file) if init_file else None,
        threads=threads,
        device=str(device),
        # The input normalisation the encoder learns on: `train --init RUN` uses it.
        input=spec.model_dump(mode="json"),
        views=asdict(SimCLRViewConfig()),
        encoder_file=ENCODER_FILE,
        argv=shlex.join(sys.argv),
        torch_version=torch.__version__,
        torchvision_version=torchvision.__version__,
        created=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    as_read: dict[str, object] = json.loads(json.dumps(resolved))  # tuples as lists
    return as_read


def _append_metrics_row(path: Path, row: dict[str, float]) -> None:
    new_file = not path.exists()
    with path.open("a", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=METRICS_COLUMNS)
        if new_file:
            writer.writeheader()
        writer.writerow({key: f"{row[key]:.6g}" for key in METRICS_COLUMNS})


def _write_json(path: Path, payload: object) -> None:
    path.write_text(json.dumps(payload, indent=2) + "\n")


def read_metrics(run_dir: Path) -> list[dict[str, float]]:
    """metrics.csv of a pretrain run as numbers, one dict per epoch."""
    with (run_dir / METRICS_FILE).open(newline="") as stream:
        return [{key: float(value) for key, value in row.items()} for row in csv.DictReader(stream)]
