"""A Celery worker factory for the distributed pass: imports the project once, then forks a
ready-to-start worker per test, which skips the second or two a fresh interpreter spends
importing Django, Celery and the project.

Started by tests/conftest.py with the test database's and the test Redis's environment. Each
line on stdin is a JSON object {"argv": [...], "log": "<path>"}; the zygote forks a child that
sends its output to the log and runs ``celery worker`` with argv, and answers with the child's
pid on a line of stdout. The zygote reaps its children; it exits when stdin closes. Nothing is
connected before the fork: the children open their own database and broker connections."""

from __future__ import annotations

import json
import os
import random
import signal
import sys


def _reap(*_: object) -> None:
    while True:
        try:
            pid, _status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _child(argv: list[str], log: str) -> None:
    random.seed()  # not the zygote's sequence, which every earlier child also had
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    os.setpgid(0, 0)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)  # emptied by the test
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    from console.celery import app

    try:
        app.worker_main(argv)
    finally:
        os._exit(0)


def main() -> None:
    import django

    django.setup()
    from console.celery import app

    app.loader.import_default_modules()
    signal.signal(signal.SIGCHLD, _reap)
    out = sys.stdout
    for line in sys.stdin:
        request = json.loads(line)
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:
            _child(request["argv"], request["log"])
        out.write(f"{pid}\n")
        out.flush()


if __name__ == "__main__":
    main()
