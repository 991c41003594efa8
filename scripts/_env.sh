# Shared by scripts/demo and scripts/test: find Python 3.12+, create .venv, install the lock.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

find_python() {
    local candidates=(python3.13 python3.12 python3)
    local dir
    for dir in "$HOME"/.pyenv/versions/3.1[2-9]*/bin /usr/local/bin /usr/bin; do
        [ -x "$dir/python3" ] && candidates+=("$dir/python3")
    done
    local c
    for c in "${candidates[@]}"; do
        if "$c" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' >/dev/null 2>&1; then
            echo "$c"
            return 0
        fi
    done
    echo "Switchboard needs Python 3.12 or newer; none was found on PATH or in ~/.pyenv." >&2
    return 1
}

VENV="$ROOT/.venv"
if [ ! -x "$VENV/bin/python" ]; then
    PY="$(find_python)"
    echo "Creating $VENV with $("$PY" --version)"
    "$PY" -m venv "$VENV"
fi
STAMP="$VENV/.lock-installed"
if [ ! -f "$STAMP" ] || ! cmp -s requirements.lock "$STAMP"; then
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -r requirements.lock
    cp requirements.lock "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
PY="$VENV/bin/python"

# With DEBUG off, start-up refuses a missing or public secret key: unless SECRET_KEY is set, make
# one for this checkout once, kept in .secret-key (gitignored, readable by its owner only).
if [ -z "${SECRET_KEY:-}" ]; then
    KEY_FILE="$ROOT/.secret-key"
    if [ ! -s "$KEY_FILE" ]; then
        (umask 077 && "$PY" -c 'import secrets; print(secrets.token_urlsafe(50))' >"$KEY_FILE")
    fi
    SECRET_KEY="$(cat "$KEY_FILE")"
    export SECRET_KEY
fi
