"""`celery` with the fault-test tools registered: python -m tests.faults.worker -A console worker"""

from __future__ import annotations

import sys

from tests.faults.tools import register

if __name__ == "__main__":
    register()
    from celery.bin.celery import main

    sys.argv = ["celery", *sys.argv[1:]]
    sys.exit(main())
