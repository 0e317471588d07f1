#!/usr/bin/env bash
# Install PlantSync Edge as a systemd service, from this checkout:
#
#   1. a virtualenv in /opt/plantsync with the project installed into it (pip, from here);
#   2. the `plantsync` system user and group (no login, no home of its own);
#   3. /etc/plantsync (root:plantsync, 0750) with plant.yaml copied from
#      config/plant.example.yaml when there is none yet (root:plantsync, 0640: the service
#      reads it, nobody else does), and /etc/credstore for the ${cred:NAME} secrets;
#   4. the unit in /etc/systemd/system, then `systemctl daemon-reload` and `enable`.
#
# It never starts the service, never overwrites a config, and can run again (an upgrade:
# the package is reinstalled, the rest is kept). `--dry-run` prints what it would do and
# changes nothing; it needs no root.
#
#   sudo systemd/install.sh [--dry-run] [--prefix /opt/plantsync] [--python python3]

set -euo pipefail

PREFIX=/opt/plantsync
CONFIG_DIR=/etc/plantsync
UNIT_DIR=/etc/systemd/system
CREDSTORE=/etc/credstore
SERVICE_USER=plantsync
PYTHON=python3
DRY_RUN=0

usage() {
    sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'
}

while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY_RUN=1 ;;
        --prefix) PREFIX=${2:?--prefix needs a directory}; shift ;;
        --python) PYTHON=${2:?--python needs an interpreter}; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "install.sh: unknown option $1 (try --help)" >&2; exit 2 ;;
    esac
    shift
done

SOURCE=$(cd "$(dirname "$0")/.." && pwd)
UNIT_SOURCE="$SOURCE/systemd/plantsync.service"

# Every change goes through `run`: in a dry run it is printed, shell-quoted, instead.
run() {
    if [ "$DRY_RUN" = 1 ]; then
        printf '  +'
        printf ' %q' "$@"
        printf '\n'
    else
        "$@"
    fi
}

step() {
    printf '==> %s\n' "$*"
}

if [ "$DRY_RUN" = 1 ]; then
    echo "Dry run: nothing is changed; these are the steps and commands."
elif [ "$(id -u)" != 0 ]; then
    echo "install.sh: run it as root (sudo), or with --dry-run to see what it does" >&2
    exit 1
fi
test -f "$UNIT_SOURCE" || { echo "install.sh: $UNIT_SOURCE is missing" >&2; exit 1; }

# What the install needs, checked before anything is changed (a dry run checks too), each
# failure saying what to install or open.
step "Checking $PYTHON and the package index"
if ! command -v "$PYTHON" >/dev/null 2>&1; then
    echo "install.sh: $PYTHON is not installed. On Debian: apt-get install python3 python3-venv" >&2
    exit 1
fi
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' >/dev/null 2>&1; then
    echo "install.sh: $PYTHON is older than Python 3.11, which PlantSync Edge needs" >&2
    exit 1
fi
if ! "$PYTHON" -c 'import venv, ensurepip' >/dev/null 2>&1; then
    echo "install.sh: $PYTHON cannot make a virtualenv (no venv or ensurepip module)." \
        "On Debian: apt-get install python3-venv" >&2
    exit 1
fi
INDEX=${PIP_INDEX_URL:-https://pypi.org/simple}
if ! "$PYTHON" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=15)' \
        "${INDEX%/}/pip/" >/dev/null 2>&1; then
    echo "install.sh: the package index $INDEX does not answer, and the install downloads" \
        "PlantSync Edge's dependencies from it. Give this box access to it (a proxy:" \
        "export https_proxy=http://proxy:3128), or set PIP_INDEX_URL to your plant's mirror" >&2
    exit 1
fi
echo "  $($PYTHON --version 2>&1) with venv; package index $INDEX answers"

step "Virtualenv $PREFIX with PlantSync Edge from $SOURCE"
run "$PYTHON" -m venv "$PREFIX"
run "$PREFIX/bin/python" -m pip install --quiet --upgrade pip
run "$PREFIX/bin/python" -m pip install --quiet "$SOURCE"

step "System user and group $SERVICE_USER"
if getent passwd "$SERVICE_USER" >/dev/null 2>&1; then
    echo "  user $SERVICE_USER exists; kept"
else
    run useradd --system --user-group --no-create-home --home-dir /var/lib/plantsync \
        --shell /usr/sbin/nologin --comment "PlantSync Edge gateway" "$SERVICE_USER"
fi

step "Config in $CONFIG_DIR"
run install -d -m 0750 -o root -g "$SERVICE_USER" "$CONFIG_DIR"
if [ -e "$CONFIG_DIR/plant.yaml" ]; then
    echo "  $CONFIG_DIR/plant.yaml exists; kept as it is"
else
    run install -m 0640 -o root -g "$SERVICE_USER" "$SOURCE/config/plant.example.yaml" \
        "$CONFIG_DIR/plant.yaml"
fi
run install -d -m 0700 -o root -g root "$CREDSTORE"

step "Unit $UNIT_DIR/plantsync.service"
if [ "$PREFIX" = /opt/plantsync ]; then
    run install -m 0644 -o root -g root "$UNIT_SOURCE" "$UNIT_DIR/plantsync.service"
else
    # Another prefix: the unit's commands point into it.
    if [ "$DRY_RUN" = 1 ]; then
        echo "  + sed 's#/opt/plantsync/#$PREFIX/#g' $UNIT_SOURCE > $UNIT_DIR/plantsync.service"
    else
        sed "s#/opt/plantsync/#$PREFIX/#g" "$UNIT_SOURCE" > "$UNIT_DIR/plantsync.service"
        chmod 0644 "$UNIT_DIR/plantsync.service"
    fi
fi
run systemctl daemon-reload
run systemctl enable plantsync.service

if [ "$DRY_RUN" = 1 ]; then
    printf '\nDry run done: nothing was changed. After a real install:\n'
else
    printf '\nInstalled. Next:\n'
fi
cat <<EOF
  1. Edit $CONFIG_DIR/plant.yaml, then check it (--offline: everything but the secrets'
     values, which this shell does not have; the service checks in full at each start):
       sudo -u $SERVICE_USER $PREFIX/bin/plantsync check --offline --config $CONFIG_DIR/plant.yaml
  2. Secrets: \${ENV_VAR} values go in $CONFIG_DIR/plantsync.env (root, 0600);
     \${cred:NAME} values in $CREDSTORE/NAME (root, 0600), one LoadCredential=NAME each
     (systemctl edit plantsync).
  3. Start it and watch it:
       systemctl start plantsync
       systemctl status plantsync        # STATUS= line: drivers, outbox, back-pressure
       journalctl -u plantsync -f        # JSON lines
       $PREFIX/bin/plantsync status --config $CONFIG_DIR/plant.yaml
EOF
