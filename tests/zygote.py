"""A factory of the tests' Celery workers and daphne servers: imports the project once, then forks
a ready-to-start process per test, which skips the second and more a fresh interpreter spends
importing Django, Celery, Channels and the project.

Started by tests/conftest.py with the environment its children are to have (the test database,
the test Redis, ...). Each line on stdin is a JSON object {"main": "celery" | "daphne", "argv":
[...], "log": "<path>"}; the zygote forks a child that sends its output to the log and runs
``celery worker`` or ``daphne`` with argv, and answers with the child's pid on a line of stdout.
The zygote reaps its children; it exits when stdin closes, and its children get SIGTERM when it
does (so none outlives a test process that died without its teardown).

Nothing is connected or started before the fork: the children open their own database and broker
connections, and build their own event loop. Daphne makes its loop (and installs Twisted's reactor
on it) when ``daphne.server`` is first imported, which ``django.setup()`` does through daphne's
app; a loop made here would be one epoll instance shared by every child. So the zygote sets up
Django with a placeholder in its place and removes it before forking: each daphne child imports
the real module, and with it a loop of its own."""

from __future__ import annotations

import ctypes
import json
import os
import random
import signal
import sys
import threading
import traceback
import types

DAPHNE_SERVER = "daphne.server"
PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _reap(*_: object) -> None:
    while True:
        try:
            pid, _status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _celery(argv: list[str]) -> None:
    from console.celery import app

    app.worker_main(argv)


def _daphne(argv: list[str]) -> None:
    from daphne.cli import CommandLineInterface

    CommandLineInterface().run(argv)


MAINS = {"celery": _celery, "daphne": _daphne}


def _child(main: str, argv: list[str], log: str, zygote: int) -> None:
    code = 1
    try:
        random.seed()  # not the zygote's sequence, which every earlier child also had
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        # Its own process group (a kill of the test's group leaves it to the test's teardown),
        # so it must not outlive the zygote, which exits when the test process does.
        os.setpgid(0, 0)
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != zygote:  # the zygote died before the line above
            return
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)  # emptied by the test
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        sys.stdout.reconfigure(line_buffering=True)  # the log is a file now, not the pipe
        MAINS[main](argv)
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    except BaseException:
        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        os._exit(code)


def _set_up() -> None:
    import django

    sys.modules[DAPHNE_SERVER] = types.ModuleType(DAPHNE_SERVER)
    try:
        django.setup(set_prefix=False)
    finally:
        del sys.modules[DAPHNE_SERVER]
    import channels.routing  # noqa: F401
    import django.core.asgi  # noqa: F401

    import console.routing  # noqa: F401
    import console.urls  # noqa: F401
    from console.celery import app

    app.loader.import_default_modules()
    from django.db import connections

    connections.close_all()
    if DAPHNE_SERVER in sys.modules or "twisted.internet.reactor" in sys.modules:
        raise RuntimeError("setting up imported daphne.server or installed a Twisted reactor")
    if threading.active_count() != 1:  # a fork copies only the thread that forks
        names = [t.name for t in threading.enumerate()]
        raise RuntimeError(f"the zygote started threads before forking: {names}")


def main() -> None:
    _set_up()
    signal.signal(signal.SIGCHLD, _reap)
    out = sys.stdout
    for line in sys.stdin:
        request = json.loads(line)
        sys.stdout.flush()
        zygote = os.getpid()
        pid = os.fork()
        if pid == 0:
            _child(request["main"], request["argv"], request["log"], zygote)
        out.write(f"{pid}\n")
        out.flush()


if __name__ == "__main__":
    main()
