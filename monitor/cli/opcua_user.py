"""`crystal-monitor opcua-user add|list|remove`: the users of the OPC UA production profile.

Writes the users file the server reads (`opcua.users_file`, or `--users-file`): one
`name:role:scrypt$...` line per user, the file replaced atomically with mode 0600. The
running server re-reads it at the next login, so no restart is needed; a removed user's
open sessions last until they close. The password comes from a prompt (asked twice) or,
for scripts, from the first line of stdin with `--password-stdin`; it never appears on
the command line, where `ps` would show it.

Exit codes: 0 done, 1 the user exists (add without --replace) or does not (remove),
64 a bad name, role or password, 65 a malformed users file, 66 no users file (list,
remove), 78 a configuration that does not validate or names no users_file.
"""

from __future__ import annotations

import argparse
import getpass
import sys
from pathlib import Path

from monitor.config.settings import EX_CONFIG, ConfigError, load_settings
from monitor.publishers.opcua_users import (
    DEFAULT_ROLE,
    ROLES,
    UserExistsError,
    UsersFileError,
    check_user_name,
    load_user_entries,
    remove_user,
    write_user,
)

EX_USAGE = 64  # sysexits: the command was used wrongly (a bad name, role or password)
EX_DATAERR = 65  # sysexits: the users file is malformed
EX_NOINPUT = 66  # sysexits: there is no users file to read
MIN_PASSWORD_LENGTH = 8
"""The server listens on the plant network; a shorter password is refused."""


class _CommandError(Exception):
    """A problem to print as one line, with the exit code it stands for."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def resolve_users_file(args: argparse.Namespace) -> Path:
    """The users file: `--users-file`, else the `opcua.users_file` of `--config`."""
    if args.users_file is not None:
        return Path(args.users_file)
    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        raise _CommandError(
            "\n".join(f"config error: {problem}" for problem in exc.problems), EX_CONFIG
        ) from exc
    if settings.opcua.users_file is None:
        raise _CommandError(
            f"config error: opcua.users_file: not set in {args.config} (set it, e.g. "
            "users_file = '/etc/crystal-monitor/opcua-users', or pass --users-file)",
            EX_CONFIG,
        )
    return settings.opcua.users_file


def read_password(from_stdin: bool) -> str:
    """The new password: stdin's first line, or typed twice at a prompt."""
    if from_stdin:
        password = sys.stdin.readline().removesuffix("\n").removesuffix("\r")
    elif not sys.stdin.isatty():
        raise _CommandError(
            "no terminal to ask for the password on: pass --password-stdin and write it to stdin",
            EX_USAGE,
        )
    else:
        password = getpass.getpass("password: ")
        if getpass.getpass("password again: ") != password:
            raise _CommandError("the two passwords differ; nothing was changed", EX_USAGE)
    if len(password) < MIN_PASSWORD_LENGTH:
        raise _CommandError(
            f"the password must have at least {MIN_PASSWORD_LENGTH} characters", EX_USAGE
        )
    return password


def _existing_role(path: Path, name: str) -> str | None:
    if not path.exists():
        return None
    entry = load_user_entries(path).get(name)
    return None if entry is None else entry.role


def run_add(args: argparse.Namespace) -> int:
    path = resolve_users_file(args)
    try:
        check_user_name(args.name)
    except ValueError as exc:
        raise _CommandError(str(exc), EX_USAGE) from exc
    if not path.parent.is_dir():
        raise _CommandError(
            f"folder {path.parent} of the users file does not exist (create it first)", EX_USAGE
        )
    existing = _existing_role(path, args.name)
    if existing is not None and not args.replace:
        raise _CommandError(
            f"user {args.name!r} is already in {path} (add --replace to change its "
            "password or role)",
            1,
        )
    # A replaced user keeps its role unless --role says otherwise.
    role = args.role or existing or DEFAULT_ROLE
    password = read_password(args.password_stdin)
    try:
        write_user(path, args.name, password, role, replace=args.replace)
    except UserExistsError as exc:  # added by someone else since the check above
        raise _CommandError(f"{exc} (add --replace to change it)", 1) from exc
    done = "replaced" if existing is not None else "added"
    print(f"{done} user {args.name!r} ({role}) in {path}", file=sys.stderr)
    return 0


def run_list(args: argparse.Namespace) -> int:
    path = resolve_users_file(args)
    if not path.exists():
        raise _CommandError(
            f"no users file {path} (`crystal-monitor opcua-user add` creates it)", EX_NOINPUT
        )
    users = load_user_entries(path)
    if not users:
        print(f"no users in {path}", file=sys.stderr)
    width = max((len(name) for name in users), default=0)
    for name, entry in users.items():
        print(f"{name:<{width}}  {entry.role}")  # never the hash
    return 0


def run_remove(args: argparse.Namespace) -> int:
    path = resolve_users_file(args)
    if not path.exists():
        raise _CommandError(f"no users file {path}", EX_NOINPUT)
    if args.name not in load_user_entries(path):
        raise _CommandError(f"no user {args.name!r} in {path}", 1)
    remove_user(path, args.name)
    print(
        f"removed user {args.name!r} from {path} (its open sessions last until they close)",
        file=sys.stderr,
    )
    return 0


def run_opcua_user(args: argparse.Namespace) -> int:
    """Run one action; every failure is one line on stderr and its exit code."""
    try:
        return int(args.action(args))
    except _CommandError as exc:
        print(f"error: {exc}" if exc.exit_code != EX_CONFIG else str(exc), file=sys.stderr)
        return exc.exit_code
    except UsersFileError as exc:
        print(f"error: {exc} (fix or remove that line)", file=sys.stderr)
        return EX_DATAERR
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EX_NOINPUT if isinstance(exc, FileNotFoundError) else 1


def _add_file_arguments(parser: argparse.ArgumentParser) -> None:
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--users-file", type=Path, help="the users file to change")
    where.add_argument(
        "--config", type=Path, help="or the daemon's configuration (its opcua.users_file)"
    )


def add_opcua_user_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action_name", required=True, metavar="ACTION")

    add = actions.add_parser("add", help="add a user, or with --replace change one")
    add.add_argument("name", help="user name: 1-64 letters, digits, '_', '.', '@' or '-'")
    add.add_argument(
        "--role",
        choices=ROLES,
        help="operator: read and call Acknowledge, Shelve, StartBatch, StopBatch; viewer: "
        "read only (default: operator, or the role a replaced user has)",
    )
    add.add_argument(
        "--password-stdin",
        action="store_true",
        help="read the password from the first line of stdin instead of a prompt",
    )
    add.add_argument(
        "--replace", action="store_true", help="change the password (and role) of a user"
    )
    _add_file_arguments(add)
    add.set_defaults(action=run_add)

    listing = actions.add_parser("list", help="print the user names and their roles")
    _add_file_arguments(listing)
    listing.set_defaults(action=run_list)

    remove = actions.add_parser("remove", help="remove a user")
    remove.add_argument("name", help="user name")
    _add_file_arguments(remove)
    remove.set_defaults(action=run_remove)
