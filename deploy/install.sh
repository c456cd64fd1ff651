#!/usr/bin/env bash
# Install crystal-monitor on a plant host (run as root):
#   sudo deploy/install.sh /path/to/crystal-monitor         # a source checkout
#   sudo deploy/install.sh crystal_monitor-0.1.0-py3-none-any.whl
#
# Creates the venv /opt/crystal-monitor/venv, installs the systemd units from
# systemd/ (they use DynamicUser=, so no user is created), creates
# /etc/crystal-monitor with an example config if there is none and
# /etc/crystal-monitor/credentials (mode 0700), validates the config and reloads
# systemd. It enables nothing: it prints how to.
set -euo pipefail

# The locations can be moved for a staged install or a test run; the units expect these.
PREFIX=${CRYSTAL_MONITOR_PREFIX:-/opt/crystal-monitor}
VENV="$PREFIX/venv"
CONF_DIR=${CRYSTAL_MONITOR_CONF_DIR:-/etc/crystal-monitor}
UNIT_DIR=${CRYSTAL_MONITOR_UNIT_DIR:-/etc/systemd/system}
PYTHON=${PYTHON:-python3}
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

if [[ $# -ne 1 ]]; then
    echo "usage: $0 PACKAGE   (a crystal-monitor source folder or wheel)" >&2
    exit 64
fi
PACKAGE="$1"
if [[ $EUID -ne 0 ]]; then
    echo "error: run as root (it writes $PREFIX, $CONF_DIR and $UNIT_DIR)" >&2
    exit 77
fi
if [[ ! -e "$PACKAGE" ]]; then
    echo "error: $PACKAGE not found (give a source folder or a .whl file)" >&2
    exit 66
fi

# The units: from the package argument when it is a checkout, else beside this script.
if [[ -d "$PACKAGE/systemd" ]]; then
    UNITS="$PACKAGE/systemd"
else
    UNITS="$HERE/../systemd"
fi
if [[ ! -f "$UNITS/crystal-monitor@.service" ]]; then
    echo "error: systemd units not found in $UNITS (run from a source checkout)" >&2
    exit 66
fi

echo "==> venv $VENV"
install -d -m 0755 "$PREFIX"
if [[ ! -x "$VENV/bin/python" ]]; then
    "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --upgrade --quiet pip
"$VENV/bin/python" -m pip install --upgrade "$PACKAGE"
CM="$VENV/bin/crystal-monitor"
if [[ -f "$PACKAGE/README.md" ]]; then
    install -m 0644 "$PACKAGE/README.md" "$PREFIX/README.md"  # the units' Documentation=
fi

echo "==> systemd units to $UNIT_DIR"
install -d -m 0755 "$UNIT_DIR"
install -m 0644 "$UNITS/crystal-monitor.service" "$UNITS/crystal-monitor@.service" "$UNIT_DIR/"

echo "==> configuration in $CONF_DIR"
install -d -m 0755 "$CONF_DIR"
install -d -m 0700 "$CONF_DIR/credentials"
CONFIG="$CONF_DIR/crystal-monitor.toml"
if [[ ! -e "$CONFIG" ]]; then
    "$CM" print-default-config > "$CONFIG"
    chmod 0644 "$CONFIG"
    echo "    wrote the example config $CONFIG: edit the probes before starting"
else
    echo "    keeping the existing $CONFIG"
fi

echo "==> validate-config"
# A config error does not stop the install (the example's probe folders may not exist
# yet); `crystal-monitor doctor --config` checks folders, model, broker and ports.
if ! "$CM" validate-config "$CONFIG"; then
    echo "    fix the errors above, then: $CM doctor --config $CONFIG" >&2
fi

if [[ -d /run/systemd/system ]]; then
    systemctl daemon-reload
else
    echo "==> systemd is not running here: skipped systemctl daemon-reload"
fi

cat <<MSG

Installed. Next:
  $CM doctor --config $CONFIG
  One daemon for all probes:   systemctl enable --now crystal-monitor
  One instance per reactor:    cp $CONFIG $CONF_DIR/R1.toml   (edit it)
                               systemctl enable --now crystal-monitor@R1
  MQTT password (optional):    root-owned, mode 0600, in $CONF_DIR/credentials/mqtt-password
  Logs:                        journalctl -u crystal-monitor -f
MSG
