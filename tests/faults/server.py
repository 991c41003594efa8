"""`daphne` with the fault-test tools registered (standalone work runs inside the server):
python -m tests.faults.server -b 127.0.0.1 -p PORT console.asgi:application"""

from __future__ import annotations

import sys

from tests.faults.tools import register

if __name__ == "__main__":
    register()
    from daphne.cli import CommandLineInterface

    sys.argv = ["daphne", *sys.argv[1:]]
    CommandLineInterface.entrypoint()
