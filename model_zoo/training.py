"""Train a classifier from an ImageFolder into a run directory.

A run directory holds everything `export` needs and everything a reviewer wants:

* `args.json`: resolved options, the exact command line, classes in output order,
  the input spec;
* `splits.json`: which file went to which split;
* `metrics.csv`: one row per epoch, appended as training goes;
* `checkpoint.pt`: the best state_dict (plain tensors);
* `evaluation.json`, `training_curves.png`, `confusion_matrix.png`: the best
  checkpoint on the validation and test splits.

Images pass through `augment_crop` (training only) and then
`monitor.imaging.preprocess.prepare_image`/`prepare_batch`, the functions the daemon uses.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torchvision
from torch import nn
from torch.utils.data import DataLoader, Dataset, WeightedRandomSampler
from tqdm import tqdm

from model_zoo.augment import AugmentConfig, augment_crop
from model_zoo.checkpoint import (
    ARGS_FILE,
    CHECKPOINT_FILE,
    InitialWeightsSource,
    extract_state_dict,
    load_initial_weights,
    locate_initial_weights,
    save_state_dict,
)
from model_zoo.errors import ModelZooError
from model_zoo.imagefolder import (
    DEFAULT_FRACTIONS,
    DatasetError,
    LoadedImages,
    count_per_class,
    load_images,
    reserved_folders,
    resolve_splits,
)
from model_zoo.metrics import compute_metrics, format_metrics_table
from model_zoo.plots import plot_confusion_matrices, plot_training_curves
from model_zoo.registry import (
    create_model,
    imagenet_source,
    input_normalisation,
    load_imagenet_weights,
)
from monitor.imaging.preprocess import prepare_batch, prepare_image
from monitor.manifest import EvaluationMetrics, InputSpec, sha256_of_file

SPLITS_FILE = "splits.json"
METRICS_FILE = "metrics.csv"
EVALUATION_FILE = "evaluation.json"
CURVES_FILE = "training_curves.png"
CONFUSION_FILE = "confusion_matrix.png"
RUN_FILES = (
    ARGS_FILE,
    SPLITS_FILE,
    METRICS_FILE,
    CHECKPOINT_FILE,
    EVALUATION_FILE,
    CURVES_FILE,
    CONFUSION_FILE,
)
METRICS_COLUMNS = (
    "epoch",
    "train_loss",
    "val_loss",
    "val_accuracy",
    "val_macro_f1",
    "lr",
    "seconds",
    "train_images_per_s",
)

Balance = Literal["weighted-sampler", "loss-weights", "none"]
# Initial weights: random ("scratch"), the architecture's installed ImageNet weights,
# or a local state_dict file or run directory (a pretrain run's encoder.pt, a previous
# run's checkpoint.pt).
Init = Literal["scratch", "imagenet"] | Path
# Where stderr is not a terminal (a log file, journald), a line every this many
# seconds instead of a carriage-return bar.
PROGRESS_LOG_INTERVAL_S = 30.0


@dataclass(frozen=True)
class TrainOptions:
    """Everything that defines a training run; saved to args.json as resolved."""

    data_dir: Path
    out_dir: Path
    arch: str = "mobilenet_v3_small"
    input_size: int = 96
    resize: Literal["letterbox", "stretch"] = "letterbox"
    epochs: int = 30
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.05
    schedule: Literal["cosine", "onecycle"] = "cosine"
    patience: int = 8
    seed: int = 0
    init: Init = "scratch"
    workers: int = 0
    threads: int = 0  # 0 = all cores
    uncertainty_threshold: float = 0.6
    balance: Balance = "loss-weights"
    layout: Literal["auto", "class-folders", "split-folders"] = "auto"
    split: tuple[float, float, float] = DEFAULT_FRACTIONS
    device: str = "auto"
    augment: bool = True
    overwrite: bool = False
    command: str = field(default="", compare=False)


@dataclass(frozen=True)
class TrainResult:
    run_dir: Path
    best_epoch: int
    epochs_run: int
    validation: EvaluationMetrics
    test: EvaluationMetrics | None


class AugmentedCrops(Dataset[tuple[torch.Tensor, int]]):
    """In-memory crops -> (3, S, S) tensors, augmented when a config is given.

    Each sample draws from its own generator seeded by (seed, epoch, index), so a
    run is reproducible whatever the number of loader workers.
    """

    def __init__(
        self,
        images: Sequence[np.ndarray],
        labels: np.ndarray,
        spec: InputSpec,
        *,
        seed: int,
        augment: AugmentConfig | None,
    ) -> None:
        self.images = images
        self.labels = labels
        self.spec = spec
        self.seed = seed
        self.augment = augment
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        grey = self.images[index]
        if self.augment is not None:
            rng = np.random.default_rng((self.seed, self.epoch, index))
            grey = augment_crop(grey, rng, self.augment)
        return torch.from_numpy(prepare_image(grey, self.spec)), int(self.labels[index])


def train_model(options: TrainOptions) -> TrainResult:
    """Run one training and write the run directory; return the best checkpoint's metrics."""
    _check_options(options)
    init_source = locate_initial_weights(options.init) if isinstance(options.init, Path) else None
    init_file = init_source.file if init_source else _resolve_init_file(options)
    device = resolve_device(options.device)
    splits = resolve_splits(options.data_dir, options.layout, options.split, options.seed)
    classes = splits.classes
    skipped = reserved_folders(options.data_dir)
    if skipped:
        print(f"not classes, left out: {', '.join(skipped)}", file=sys.stderr)
    if not splits.validation:
        raise DatasetError(
            f"the validation split of {options.data_dir} is empty; early stopping and the "
            "manifest's confusion matrix need one (add images to val/ or raise --split)"
        )
    run_dir = _prepare_run_dir(options.out_dir, overwrite=options.overwrite)
    threads = options.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    seed_everything(options.seed)
    loaded = {
        name: load_images(files, threads=threads, description=f"decode {name}")
        for name, files in splits.named_splits()
    }
    _report_unreadable(loaded)
    train_set, validation_set, test_set = loaded["train"], loaded["validation"], loaded["test"]
    train_counts = count_per_class(train_set.files, len(classes))
    if min(train_counts) == 0 or not validation_set.files:
        raise DatasetError(
            f"after decoding, train per class is {dict(zip(classes, train_counts, strict=True))} "
            f"and validation has {len(validation_set.files)} images; every class needs training "
            "images and validation cannot be empty"
        )
    # The architecture's normalisation (the [-1, 1] of the Lite weights, else ImageNet
    # statistics), whatever the init: a checkpoint fine-tuned from ImageNet weights and
    # passed back as --init PATH must see the inputs it learned on. Weights from a run
    # that recorded another normalisation (a pretrain or train run's args.json) get that
    # one instead, for the same reason. The manifest carries it to the daemon.
    mean, std = _resolve_normalisation(options, init_source)
    spec = InputSpec(size=options.input_size, resize=options.resize, mean=mean, std=std)

    splits_json = splits.to_json(options.data_dir)
    splits_json["unreadable"] = [
        [str(path), reason] for images in loaded.values() for path, reason in images.unreadable
    ]
    _write_json(run_dir / SPLITS_FILE, splits_json)
    _write_json(
        run_dir / ARGS_FILE,
        _describe_run(
            options,
            classes=classes,
            spec=spec,
            threads=threads,
            device=device,
            layout=splits.layout,
            init_file=init_file,
            init_source=init_source,
        ),
    )
    print(
        f"classes {list(classes)}; train {len(train_set.files)} {train_counts}, validation "
        f"{len(validation_set.files)}, test {len(test_set.files)} ({splits.layout}); "
        f"{options.arch} at {spec.size} px on {device} with {threads} threads",
        file=sys.stderr,
    )

    model = create_model(options.arch, len(classes))
    # Batch norm keeps learning its statistics and nothing is frozen, also when
    # fine-tuning ImageNet weights on a few hundred crops: greyscale probe images are far
    # from ImageNet's photographs (the ImageNet running statistics would normalise them
    # wrongly), a batch of 64 estimates them well, and momentum 0.1 adapts them within an
    # epoch. Freezing the stem saves little (a 3x3 conv of 32 channels) on such a shift.
    if options.init == "imagenet":
        load_imagenet_weights(model, options.arch)
        print(f"initial weights: ImageNet, from {init_file}", file=sys.stderr)
    elif init_source is not None:
        report = load_initial_weights(model, init_source.file)
        origin = f"a {init_source.kind} run, " if init_source.kind else ""
        print(
            f"initial weights from {init_source.file} ({origin}--init {options.init})",
            file=sys.stderr,
        )
        print(report.describe(), file=sys.stderr)
    model.to(device)

    dataset = AugmentedCrops(
        train_set.images,
        train_set.labels,
        spec,
        seed=options.seed,
        augment=AugmentConfig() if options.augment else None,
    )
    loader = _build_train_loader(dataset, train_counts, options)
    class_weights = None
    if options.balance == "loss-weights":
        counts = torch.tensor(train_counts, dtype=torch.float32)
        class_weights = (counts.sum() / (len(classes) * counts)).to(device)
    criterion = nn.CrossEntropyLoss(weight=class_weights)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=options.lr, weight_decay=options.weight_decay
    )
    total_steps = max(1, options.epochs * len(loader))
    scheduler = _build_scheduler(optimizer, options, total_steps)

    eval_batch = max(64, options.batch_size * 2)
    best_score = (-math.inf, -math.inf)
    best_epoch = 0
    best_state = extract_state_dict(model)
    stale_epochs = 0
    rows: list[dict[str, float]] = []
    epoch = 0
    for epoch in range(1, options.epochs + 1):
        started = time.perf_counter()
        dataset.epoch = epoch
        train_loss, lr, train_images, train_seconds = _train_one_epoch(
            model,
            loader=loader,
            criterion=criterion,
            optimizer=optimizer,
            scheduler=scheduler,
            device=device,
            description=f"epoch {epoch}/{options.epochs}",
        )
        logits = predict_logits(model, validation_set.images, spec, eval_batch, device)
        val_labels = torch.from_numpy(validation_set.labels)
        # Unweighted, so it reads the same whatever --balance is.
        val_loss = float(nn.functional.cross_entropy(logits, val_labels))
        metrics = compute_metrics(validation_set.labels, logits.argmax(1).numpy(), classes)
        row = {
            "epoch": epoch,
            "train_loss": train_loss,
            "val_loss": val_loss,
            "val_accuracy": metrics.accuracy,
            "val_macro_f1": metrics.macro_f1,
            "lr": lr,
            "seconds": time.perf_counter() - started,
            "train_images_per_s": train_images / train_seconds,
        }
        rows.append(row)
        _append_metrics_row(run_dir / METRICS_FILE, row)
        # Macro-F1 decides; validation loss breaks ties once F1 saturates.
        score = (metrics.macro_f1, -val_loss)
        improved = score > best_score
        if improved:
            best_score, best_epoch, stale_epochs = score, epoch, 0
            best_state = extract_state_dict(model)
            save_state_dict(best_state, run_dir / CHECKPOINT_FILE)
        else:
            stale_epochs += 1
        tqdm.write(
            f"epoch {epoch}: train loss {train_loss:.4f}, val loss {val_loss:.4f}, "
            f"val accuracy {metrics.accuracy:.4f}, val macro-F1 {metrics.macro_f1:.4f}, "
            f"lr {lr:.2e}, {row['seconds']:.1f} s, {row['train_images_per_s']:.0f} img/s"
            + (" *" if improved else ""),
            file=sys.stderr,
        )
        if stale_epochs >= options.patience:
            tqdm.write(
                f"early stop: no better validation macro-F1 for {options.patience} epochs",
                file=sys.stderr,
            )
            break

    model.load_state_dict(best_state)
    evaluations = {
        name: _evaluate_split(
            model, images, classes=classes, spec=spec, batch_size=eval_batch, device=device
        )
        for name, images in (("validation", validation_set), ("test", test_set))
        if images.files
    }
    _write_json(
        run_dir / EVALUATION_FILE,
        {
            "classes": list(classes),
            "best_epoch": best_epoch,
            "epochs_run": epoch,
            "validation": evaluations["validation"][0].model_dump(),
            "test": evaluations["test"][0].model_dump() if "test" in evaluations else None,
            "misclassified": {name: wrong for name, (_, wrong) in evaluations.items()},
        },
    )
    plot_training_curves(rows, run_dir / CURVES_FILE)
    plot_confusion_matrices(
        {name: metrics for name, (metrics, _) in evaluations.items()},
        classes,
        run_dir / CONFUSION_FILE,
    )
    for name, (metrics, _) in evaluations.items():
        print(f"\n{name} (best epoch {best_epoch}):\n{format_metrics_table(metrics)}")
    return TrainResult(
        run_dir=run_dir,
        best_epoch=best_epoch,
        epochs_run=epoch,
        validation=evaluations["validation"][0],
        test=evaluations["test"][0] if "test" in evaluations else None,
    )


@torch.no_grad()
def predict_logits(
    model: nn.Module,
    images: Sequence[np.ndarray],
    spec: InputSpec,
    batch_size: int,
    device: torch.device,
) -> torch.Tensor:
    """Logits for un-augmented images, preprocessed exactly as the daemon does."""
    model.eval()
    chunks = [
        model(torch.from_numpy(prepare_batch(images[start : start + batch_size], spec)).to(device))
        .float()
        .cpu()
        for start in range(0, len(images), batch_size)
    ]
    return torch.cat(chunks)


def _train_one_epoch(
    model: nn.Module,
    *,
    loader: DataLoader[tuple[torch.Tensor, int]],
    criterion: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    device: torch.device,
    description: str,
) -> tuple[float, float, int, float]:
    """One pass over the loader; returns (mean loss, last learning rate, images, seconds)."""
    model.train()
    total_loss = 0.0
    total_images = 0
    lr = optimizer.param_groups[0]["lr"]
    started = time.perf_counter()
    progress = EpochProgress(len(loader), description)
    for batch_inputs, batch_labels in loader:
        inputs = batch_inputs.to(device, non_blocking=True)
        labels = batch_labels.to(device, non_blocking=True)
        optimizer.zero_grad(set_to_none=True)
        loss = criterion(model(inputs), labels)
        loss.backward()
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
        loss_value = float(loss.detach())
        total_loss += loss_value * len(labels)
        total_images += len(labels)
        progress.update(loss_value)
    progress.close()
    seconds = time.perf_counter() - started
    return total_loss / max(1, total_images), lr, total_images, seconds


class EpochProgress:
    """Batches done, rate and ETA within an epoch, on stderr.

    On a terminal, a tqdm bar redrawn in place. Elsewhere (a log file, journald) a
    bar's carriage returns would pile up or, hidden, say nothing for a long epoch, so
    the same tqdm line is printed as a line of its own every PROGRESS_LOG_INTERVAL_S.
    """

    def __init__(self, total: int, description: str) -> None:
        self.total = total
        self.description = description
        self.done = 0
        self.started = self.last_line = time.perf_counter()
        self.bar = (
            tqdm(total=total, desc=description, unit="batch", leave=False, mininterval=1.0)
            if sys.stderr.isatty()
            else None
        )

    def update(self, loss: float) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
            self.bar.update()
            return
        now = time.perf_counter()
        if now - self.last_line >= PROGRESS_LOG_INTERVAL_S or self.done == 1:
            self.last_line = now
            line = tqdm.format_meter(
                self.done,
                self.total,
                now - self.started,
                prefix=self.description,
                unit="batch",
                postfix=f"loss={loss:.4f}",
                ncols=100,
            )
            print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _evaluate_split(
    model: nn.Module,
    images: LoadedImages,
    *,
    classes: Sequence[str],
    spec: InputSpec,
    batch_size: int,
    device: torch.device,
) -> tuple[EvaluationMetrics, list[dict[str, object]]]:
    probabilities = predict_logits(model, images.images, spec, batch_size, device).softmax(1)
    predicted = probabilities.argmax(1).numpy()
    metrics = compute_metrics(images.labels, predicted, classes)
    wrong = [
        {
            "file": str(item.path),
            "true": classes[item.label],
            "predicted": classes[int(guess)],
            "probability": round(float(probabilities[index, guess]), 6),
        }
        for index, (item, guess) in enumerate(zip(images.files, predicted, strict=True))
        if guess != item.label
    ]
    return metrics, wrong


def _build_train_loader(
    dataset: AugmentedCrops, train_counts: list[int], options: TrainOptions
) -> DataLoader[tuple[torch.Tensor, int]]:
    generator = torch.Generator().manual_seed(options.seed)
    sampler = None
    if options.balance == "weighted-sampler":
        per_class = 1.0 / torch.tensor(train_counts, dtype=torch.float64)
        sampler = WeightedRandomSampler(
            per_class[torch.from_numpy(dataset.labels)].tolist(),
            num_samples=len(dataset),
            replacement=True,
            generator=generator,
        )
    return DataLoader(
        dataset,
        batch_size=options.batch_size,
        shuffle=sampler is None,
        sampler=sampler,
        num_workers=options.workers,
        # A last batch of one image breaks batch norm; drop the remainder when we can.
        drop_last=len(dataset) > options.batch_size,
        generator=generator,
    )


def _build_scheduler(
    optimizer: torch.optim.Optimizer, options: TrainOptions, total_steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    if options.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=options.lr, total_steps=total_steps
        )
    return torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, T_max=total_steps, eta_min=options.lr * 0.01
    )


def _check_options(options: TrainOptions) -> None:
    problems = []
    if options.epochs < 1:
        problems.append("--epochs must be >= 1")
    if options.batch_size < 2:
        problems.append("--batch-size must be >= 2 (batch norm needs two images)")
    if options.patience < 1:
        problems.append("--patience must be >= 1")
    if not 0 < options.uncertainty_threshold <= 1:
        problems.append("--uncertainty-threshold must be in (0, 1]")
    if options.lr <= 0:
        problems.append("--lr must be > 0")
    if options.workers < 0 or options.threads < 0:
        problems.append("--workers and --threads must be >= 0")
    if isinstance(options.init, Path):
        try:
            locate_initial_weights(options.init).check_arch(options.arch)
        except ModelZooError as exc:
            problems.append(str(exc))
    elif options.init == "imagenet":
        imagenet_source(options.arch)  # raises naming the architectures that have one
    if problems:
        raise ModelZooError("; ".join(problems))


def _prepare_run_dir(out_dir: Path, *, overwrite: bool) -> Path:
    existing = [name for name in RUN_FILES if (out_dir / name).exists()]
    if existing and not overwrite:
        raise ModelZooError(
            f"{out_dir} already holds a run ({', '.join(existing)}); choose another --out "
            "or pass --overwrite"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in existing:
        (out_dir / name).unlink()
    return out_dir


def seed_everything(seed: int) -> None:
    """Seed every generator torch and numpy use, and ask torch for deterministic kernels."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(True, warn_only=True)


def resolve_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelZooError("--device cuda was given but torch sees no CUDA GPU; use --device cpu")
    return device


def _describe_run(
    options: TrainOptions,
    *,
    classes: Sequence[str],
    spec: InputSpec,
    threads: int,
    device: torch.device,
    layout: str,
    init_file: Path | None,
    init_source: InitialWeightsSource | None = None,
) -> dict[str, object]:
    resolved = asdict(options)
    resolved.update(
        data_dir=str(options.data_dir.resolve()),
        out_dir=str(options.out_dir.resolve()),
        # "scratch", "imagenet" or the file; init_weights is the file read in either case.
        init=str(options.init.resolve()) if isinstance(options.init, Path) else options.init,
        init_weights=str(init_file.resolve()) if init_file else None,
        init_weights_sha256=sha256_of_file(init_file) if init_file else None,
        # The run the weights came from (a pretrain run's method, arch and input), if any.
        init_run=init_source.describe() if init_source and init_source.run_args else None,
        split=list(options.split),
        threads=threads,
        device=str(device),
        layout=layout,
        classes=list(classes),
        input=spec.model_dump(mode="json"),
        argv=shlex.join(sys.argv),
        torch_version=torch.__version__,
        torchvision_version=torchvision.__version__,
        created=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    return resolved


def _resolve_init_file(options: TrainOptions) -> Path | None:
    """The ImageNet weights file the run starts from, if any (located now, to record its
    hash); --init PATH goes through `locate_initial_weights`."""
    if options.init == "imagenet":
        return imagenet_source(options.arch).locate()
    return None


def _resolve_normalisation(
    options: TrainOptions, init_source: InitialWeightsSource | None
) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """The architecture's (mean, std), or the init run's where it recorded another."""
    default = input_normalisation(options.arch)
    recorded = init_source.normalisation if init_source else None
    if recorded is None or recorded == default:
        return default
    print(
        f"input normalisation mean {list(recorded[0])}, std {list(recorded[1])}: the one "
        f"--init {options.init} learned on (not {options.arch}'s default "
        f"{list(default[0])}, {list(default[1])})",
        file=sys.stderr,
    )
    return recorded


def _report_unreadable(loaded: dict[str, LoadedImages]) -> None:
    for name, images in loaded.items():
        for path, reason in images.unreadable:
            print(f"skipped unreadable {name} image {path}: {reason}", file=sys.stderr)


def _append_metrics_row(path: Path, row: dict[str, float]) -> None:
    new_file = not path.exists()
    with path.open("a", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=METRICS_COLUMNS)
        if new_file:
            writer.writeheader()
        writer.writerow({key: f"{row[key]:.6g}" for key in METRICS_COLUMNS})


def _write_json(path: Path, payload: object) -> None:
    path.write_text(json.dumps(payload, indent=2) + "\n")
