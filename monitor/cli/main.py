"""The `crystal-monitor` command line: one subcommand per job, each in its own module."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from monitor import __version__
from monitor.cli.samples import add_samples_commands
from monitor.cli.shadow import add_shadow_commands
from monitor.cli.subcommands import add_commands

Runner = Callable[[argparse.Namespace], int]


def _add_simulate(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from monitor.simulator.command import add_simulate_arguments, run_simulate  # noqa: PLC0415

    parser = sub.add_parser(
        "simulate", help="write synthetic probe crops or frames with ground truth"
    )
    add_simulate_arguments(parser)
    parser.set_defaults(runner=run_simulate)


def _add_classify(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from monitor.cli.classify import add_classify_arguments, run_classify  # noqa: PLC0415

    parser = sub.add_parser("classify", help="classify image files with an exported model")
    add_classify_arguments(parser)
    parser.set_defaults(runner=run_classify)


def _add_doctor(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from monitor.cli.doctor import add_doctor_arguments, run_doctor  # noqa: PLC0415

    parser = sub.add_parser(
        "doctor", help="check this host and a config: backends, GPU, model, folders, ports"
    )
    add_doctor_arguments(parser)
    parser.set_defaults(runner=run_doctor)


def _add_build_engine(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from monitor.cli.build_engine import add_build_engine_arguments, run_build_engine  # noqa: PLC0415

    parser = sub.add_parser(
        "build-engine", help="build and cache the TensorRT engine at deploy time (GPU host)"
    )
    add_build_engine_arguments(parser)
    parser.set_defaults(runner=run_build_engine)


def _add_opcua_user(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from monitor.cli.opcua_user import add_opcua_user_arguments, run_opcua_user  # noqa: PLC0415

    parser = sub.add_parser(
        "opcua-user", help="add, list or remove the users of the OPC UA production profile"
    )
    add_opcua_user_arguments(parser)
    parser.set_defaults(runner=run_opcua_user)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="crystal-monitor",
        description="In-line crystallization monitor for in-situ microscope probes.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_simulate, _add_classify, _add_doctor, _add_build_engine, _add_opcua_user):
        add(sub)
    add_commands(sub)
    add_samples_commands(sub)
    add_shadow_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    runner: Runner = args.runner
    try:
        return runner(args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `crystal-monitor classify ... | head` closes the pipe early; that is not an error.
        sys.stderr.close()
        return 0
