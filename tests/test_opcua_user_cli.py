"""`crystal-monitor opcua-user add|list|remove` run as a subprocess writes the users file
that the real OPC UA server of the production profile reads, and a real asyncua client
logs in with what it wrote: the right password and role get in, a wrong password, a
removed user and a viewer calling an operator method do not."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from asyncua import ua
from asyncua.crypto.permission_rules import UserRole
from asyncua.ua.object_ids import ObjectIds

from monitor.config.settings import EX_CONFIG, load_settings
from monitor.publishers.opcua import OpcUaPublisher
from monitor.publishers.opcua_security import VIEWER_METHODS, MonitorUser, may_call
from monitor.publishers.opcua_users import (
    UsersFileError,
    hash_password,
    parse_user_entries,
)
from tests.test_opcua import (
    NS,
    Production,
    RecordingCommands,
    child,
    free_port,
    make_client_certificate,
    make_update,
    probe_node,
    secure_client,
)

SC = ua.StatusCodes


def opcua_user(*args: str, password: str | None = None) -> subprocess.CompletedProcess[str]:
    """The command as an operator runs it; `password` is written to its stdin."""
    return subprocess.run(
        [sys.executable, "-m", "monitor", "opcua-user", *args],
        input=password + "\n" if password is not None else "",
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def write_config(path: Path, url: str, users: Path, trust_dir: Path) -> Path:
    path.write_text(
        f"""
[opcua]
enabled = true
endpoint = "{url}"
namespace_uri = "{NS}"
security_profile = "production"
users_file = "{users}"
trust_dir = "{trust_dir}"

[[probes]]
id = "P1"
source = {{ type = "folder", path = "{path.parent}" }}
"""
    )
    return path


@dataclass
class Plant:
    server: Production
    config: Path


@pytest.fixture(scope="module")
def plant(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Plant]:
    """The first user added by the command, then the server started from the same
    configuration file the command read its users_file from."""
    base = tmp_path_factory.mktemp("opcua-user")
    trust_dir = base / "trusted"
    trusted = make_client_certificate(base / "client", "scada")
    trust_dir.mkdir()
    (trust_dir / "scada.der").write_bytes(trusted[0].read_bytes())
    users = base / "opcua-users"
    url = f"opc.tcp://127.0.0.1:{free_port()}/crystal-monitor"
    config = write_config(base / "crystal-monitor.toml", url, users, trust_dir)
    added = opcua_user(
        "add", "shift-a", "--config", str(config), "--password-stdin", password="shift-a-pass"
    )
    assert added.returncode == 0, added.stderr
    assert "added user 'shift-a' (operator)" in added.stderr
    state_dir = base / "state"
    publisher = OpcUaPublisher(load_settings(config).opcua, state_dir)
    commands = RecordingCommands()
    publisher.start(commands)
    publisher.publish_update(make_update("P1", ts=time.time()))
    server = Production(
        publisher, commands, url, state_dir, trusted, trusted, trusted, trust_dir, users
    )
    try:
        yield Plant(server, config)
    finally:
        publisher.stop()


def login_status(plant: Plant, user: str, password: str) -> int:
    """0 when `user` logs in and reads the probe's batch, else the refusal's status code."""

    async def scenario() -> int:
        client = await secure_client(plant.server, user, password)
        try:
            await client.connect()
        except ua.UaStatusCodeError as refused:
            return int(refused.code)
        try:
            probe = await probe_node(client, "P1")
            assert await (await child(probe, client, "Batch")).read_value() == "B-17"
        finally:
            await client.disconnect()
        return 0

    return asyncio.run(scenario())


def stop_batch_status(plant: Plant, user: str, password: str) -> int:
    """The status code of `user` calling StopBatch on probe P1 (0: Good)."""

    async def scenario() -> int:
        client = await secure_client(plant.server, user, password)
        async with client:
            probe = await probe_node(client, "P1")
            idx = await client.get_namespace_index(NS)
            try:
                await probe.call_method(f"{idx}:StopBatch")
            except ua.UaStatusCodeError as refused:
                return int(refused.code)
            return 0

    return asyncio.run(scenario())


def test_a_user_added_by_the_command_logs_in_and_calls_as_an_operator(plant: Plant) -> None:
    assert login_status(plant, "shift-a", "shift-a-pass") == 0
    assert stop_batch_status(plant, "shift-a", "shift-a-pass") == 0
    assert ("stop_batch", "P1", "shift-a") in plant.server.commands.calls


def test_a_wrong_password_for_an_added_user_is_refused(plant: Plant) -> None:
    assert login_status(plant, "shift-a", "not-the-password") == SC.BadUserAccessDenied
    assert login_status(plant, "shift-a", "shift-a-pass") == 0  # resets the failure count


def test_the_users_file_is_mode_0600_and_list_shows_names_and_roles_never_hashes(
    plant: Plant,
) -> None:
    users = plant.server.users
    assert users.stat().st_mode & 0o777 == 0o600
    assert "shift-a:operator:scrypt$" in users.read_text()
    listed = opcua_user("list", "--users-file", str(users))
    assert listed.returncode == 0, listed.stderr
    assert "shift-a  operator" in listed.stdout.splitlines()
    assert "scrypt" not in listed.stdout + listed.stderr


def test_a_viewer_reads_but_may_not_call_an_operator_method(plant: Plant) -> None:
    added = opcua_user(
        "add", "watcher", "--role", "viewer", "--users-file", str(plant.server.users),
        "--password-stdin", password="watcher-pass",
    )  # fmt: skip
    assert added.returncode == 0, added.stderr
    calls_before = list(plant.server.commands.calls)
    assert login_status(plant, "watcher", "watcher-pass") == 0
    assert stop_batch_status(plant, "watcher", "watcher-pass") == SC.BadUserAccessDenied
    assert plant.server.commands.calls == calls_before  # never reached the handler
    listed = opcua_user("list", "--config", str(plant.config))
    assert "watcher  viewer" in listed.stdout.splitlines()


def test_a_removed_user_can_no_longer_log_in(plant: Plant) -> None:
    users = str(plant.server.users)
    added = opcua_user(
        "add", "leaver", "--users-file", users, "--password-stdin", password="leaver-pass"
    )
    assert added.returncode == 0, added.stderr
    assert login_status(plant, "leaver", "leaver-pass") == 0
    removed = opcua_user("remove", "leaver", "--config", str(plant.config))
    assert removed.returncode == 0, removed.stderr
    assert login_status(plant, "leaver", "leaver-pass") == SC.BadUserAccessDenied
    assert login_status(plant, "shift-a", "shift-a-pass") == 0  # the others stay
    again = opcua_user("remove", "leaver", "--users-file", users)
    assert again.returncode == 1
    assert "no user 'leaver'" in again.stderr


def test_adding_an_existing_user_is_refused_unless_replace_which_changes_the_password(
    plant: Plant,
) -> None:
    users = str(plant.server.users)
    added = opcua_user(
        "add", "rotating", "--users-file", users, "--password-stdin", password="first-pass"
    )
    assert added.returncode == 0, added.stderr
    before = plant.server.users.read_text()
    refused = opcua_user(
        "add", "rotating", "--users-file", users, "--password-stdin", password="second-pass"
    )
    assert refused.returncode == 1
    assert "already in" in refused.stderr and "--replace" in refused.stderr
    assert plant.server.users.read_text() == before
    replaced = opcua_user(
        "add", "rotating", "--replace", "--users-file", users, "--password-stdin",
        password="second-pass",
    )  # fmt: skip
    assert replaced.returncode == 0, replaced.stderr
    assert login_status(plant, "rotating", "second-pass") == 0
    assert login_status(plant, "rotating", "first-pass") == SC.BadUserAccessDenied
    assert login_status(plant, "rotating", "second-pass") == 0  # resets the failure count


@pytest.mark.parametrize(
    ("args", "password", "words"),
    [
        pytest.param(["add", "bad name"], "long-enough", "user name 'bad name'", id="name"),
        pytest.param(["add", "shorty"], "short", "at least 8 characters", id="short password"),
        pytest.param(["add", "empty"], "", "at least 8 characters", id="empty password"),
    ],
)
def test_add_refuses_a_bad_name_or_password_with_exit_64(
    tmp_path: Path, args: list[str], password: str, words: str
) -> None:
    users = tmp_path / "users"
    result = opcua_user(*args, "--users-file", str(users), "--password-stdin", password=password)
    assert result.returncode == 64
    assert words in result.stderr
    assert not users.exists()


def test_add_refuses_a_role_outside_the_profiles_set(tmp_path: Path) -> None:
    result = opcua_user(
        "add", "boss", "--role", "admin", "--users-file", str(tmp_path / "users"),
        "--password-stdin", password="boss-pass-1",
    )  # fmt: skip
    assert result.returncode == 2  # argparse: invalid choice
    assert "'operator', 'viewer'" in result.stderr


def test_a_config_without_users_file_exits_78_naming_the_key(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text("[[probes]]\nid = 'P1'\nsource = { type = 'folder', path = '/tmp' }\n")
    result = opcua_user(
        "add", "x1", "--config", str(config), "--password-stdin", password="x1-pass-1"
    )
    assert result.returncode == EX_CONFIG
    assert "opcua.users_file: not set" in result.stderr


def test_list_of_a_malformed_file_exits_65_naming_the_line(tmp_path: Path) -> None:
    users = tmp_path / "users"
    users.write_text(f"ok:viewer:{hash_password('ok-pass-1')}\nbroken line\n")
    result = opcua_user("list", "--users-file", str(users))
    assert result.returncode == 65
    assert f"{users}:2" in result.stderr


def test_a_line_without_a_role_is_an_operator_and_an_unknown_role_names_the_line() -> None:
    encoded = hash_password("old-pass-1")
    entries = parse_user_entries(f"# before roles\nold:{encoded}\nnew:viewer:{encoded}\n")
    assert {name: entry.role for name, entry in entries.items()} == {
        "old": "operator",
        "new": "viewer",
    }
    with pytest.raises(UsersFileError, match=r"users>:1: user 'x' has role 'root'"):
        parse_user_entries(f"x:root:{encoded}\n")


def test_a_viewer_may_call_only_the_standard_refresh_methods_an_operator_any() -> None:
    refresh = ua.NodeId(ua.Int32(ObjectIds.ConditionType_ConditionRefresh))
    ours = ua.NodeId("P1/StopBatch", 2)
    viewer = MonitorUser(role=UserRole.User, name="v", monitor_role="viewer")
    operator = MonitorUser(role=UserRole.User, name="o", monitor_role="operator")
    assert refresh in VIEWER_METHODS
    assert (may_call(viewer, refresh), may_call(viewer, ours)) == (True, False)
    assert (may_call(operator, refresh), may_call(operator, ours)) == (True, True)


def test_the_service_reads_the_users_file_as_a_systemd_credential(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """users_credential: the command writes users_file (root-only under systemd), the
    unit's LoadCredential= copies it into $CREDENTIALS_DIRECTORY, the server reads it
    there. Outside the service validate-config checks the source file instead."""
    trust_dir = tmp_path / "trusted"
    trusted = make_client_certificate(tmp_path / "client", "scada")
    trust_dir.mkdir()
    (trust_dir / "scada.der").write_bytes(trusted[0].read_bytes())
    source = tmp_path / "credentials" / "opcua-users"
    source.parent.mkdir()
    url = f"opc.tcp://127.0.0.1:{free_port()}/crystal-monitor"
    config = write_config(tmp_path / "crystal-monitor.toml", url, source, trust_dir)
    config.write_text(
        config.read_text().replace(
            'security_profile = "production"',
            'security_profile = "production"\nusers_credential = "opcua-users"',
        )
    )
    added = opcua_user(
        "add", "shift-c", "--config", str(config), "--password-stdin", password="shift-c-pass"
    )
    assert added.returncode == 0, added.stderr
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    checked = subprocess.run(
        [sys.executable, "-m", "monitor", "validate-config", str(config)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert checked.returncode == 0, checked.stderr

    settings = load_settings(config)
    with pytest.raises(Exception, match=r"opcua\.users_credential.*LoadCredential=opcua-users"):
        OpcUaPublisher(settings.opcua, tmp_path / "state-none").start(RecordingCommands())

    given = tmp_path / "run-credentials"  # what systemd makes of LoadCredential=
    given.mkdir()
    (given / "opcua-users").write_bytes(source.read_bytes())
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(given))
    state_dir = tmp_path / "state"
    publisher = OpcUaPublisher(settings.opcua, state_dir)
    commands = RecordingCommands()
    publisher.start(commands)
    try:
        publisher.publish_update(make_update("P1", ts=time.time()))
        server = Production(
            publisher, commands, url, state_dir, trusted, trusted, trusted, trust_dir, given
        )
        plant = Plant(server, config)
        assert login_status(plant, "shift-c", "shift-c-pass") == 0
        assert login_status(plant, "shift-c", "wrong-password") != 0
    finally:
        publisher.stop()
