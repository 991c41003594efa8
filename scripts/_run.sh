# Shared by the production commands (scripts/serve, scripts/worker, scripts/migrate): run from
# the checkout's root, with its .venv first on PATH when there is one (in the image the
# dependencies are installed on PATH instead). Unlike scripts/_env.sh this installs nothing and
# makes no secret key: a deployment sets SECRET_KEY, the same on every process.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
if [ -x "$ROOT/.venv/bin/python" ]; then
    export PATH="$ROOT/.venv/bin:$PATH"
fi
