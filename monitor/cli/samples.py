"""`crystal-monitor samples export|import`: the review queue's crops out to an ImageFolder
for training, and labels made elsewhere back in."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from monitor.cli.subcommands import EX_DATAERR, _load_or_report
from monitor.config.settings import EX_CONFIG
from monitor.review.sample_store import SampleStore, SampleStoreError

EX_NOINPUT = 66
SAMPLES_DIR = "samples"  # as monitor.daemon.SAMPLES_DIR; the CLI does not import the daemon


def _state_dir(args: argparse.Namespace) -> Path | None:
    if args.state_dir is not None:
        return Path(args.state_dir)
    settings = _load_or_report(args.config)
    return None if settings is None else settings.daemon.state_dir


def _open(args: argparse.Namespace) -> SampleStore | int:
    state_dir = _state_dir(args)
    if state_dir is None:
        return EX_CONFIG
    try:
        return SampleStore(state_dir / SAMPLES_DIR, None, create=False)
    except SampleStoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EX_NOINPUT


def run_samples_export(args: argparse.Namespace) -> int:
    store = _open(args)
    if isinstance(store, int):
        return store
    try:
        summary = store.export(args.folder, labelled_only=args.labelled_only)
    except SampleStoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EX_DATAERR
    finally:
        store.close()
    counts = ", ".join(f"{name} {n}" for name, n in summary.per_folder.items())
    print(f"exported {summary.total} crops to {summary.folder}: {counts}")
    print(f"labels: {summary.folder / 'labels.csv'}; train with: python -m model_zoo train "
          f"{summary.folder} ... (folders named _... are not classes)")  # fmt: skip
    return 0


def run_samples_import(args: argparse.Namespace) -> int:
    operator = args.operator.strip()
    if not operator or len(operator) > 64:
        print("error: --operator must be a name of 1 to 64 characters", file=sys.stderr)
        return 64
    store = _open(args)
    if isinstance(store, int):
        return store
    try:
        summary = store.import_labels(args.folder, operator=operator, at=time.time())
    except SampleStoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EX_DATAERR
    finally:
        store.close()
    print(
        f"labelled {summary.labelled} crops as {operator}; {summary.unchanged} already so, "
        f"{summary.not_in_store} no longer in the store (evicted), "
        f"{summary.left_unlabelled} left unlabelled"
    )
    return 0


def add_samples_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser("samples", help="export or import the review queue's crops")
    commands = parser.add_subparsers(dest="samples_command", required=True, metavar="ACTION")
    for name, runner, text in (
        ("export", run_samples_export, "write the kept crops as an ImageFolder with labels.csv"),
        ("import", run_samples_import, "label crops from an export's class folders"),
    ):
        action = commands.add_parser(name, help=text)
        action.add_argument("folder", type=Path, help="the export's folder")
        source = action.add_mutually_exclusive_group(required=True)
        source.add_argument("--config", type=Path, help="the daemon's configuration file")
        source.add_argument("--state-dir", type=Path, help="or the state folder directly")
        if name == "export":
            action.add_argument(
                "--labelled-only", action="store_true", help="leave out _unlabelled/"
            )
        else:
            action.add_argument(
                "--operator", required=True, help="who made these labels (recorded with each)"
            )
        action.set_defaults(runner=runner)
