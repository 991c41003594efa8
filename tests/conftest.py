"""Shared fixtures. The suite runs twice (see scripts/test): standalone on SQLite with the
in-process worker pool, and distributed on PostgreSQL + Redis with a real Celery worker."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from django.conf import settings

ROOT = Path(__file__).resolve().parent.parent
DISTRIBUTED = settings.SWITCHBOARD_MODE == "distributed"
CHROMIUM = os.environ.get("SWITCHBOARD_CHROMIUM", "/usr/bin/chromium")
ASYNC_UNSAFE = "DJANGO_ALLOW_ASYNC_UNSAFE"  # set while _Chromium runs, in this process only
POSTGRES = settings.DATABASES["default"]["ENGINE"].endswith("postgresql")
REQUIRE_SERVICES = os.environ.get("SWITCHBOARD_REQUIRE_SERVICES", "").lower() in {"1", "true"}
# Under pytest-xdist each worker process writes its services' logs to its own folder.
ARTIFACTS = ROOT / "artifacts" / os.environ.get("PYTEST_XDIST_WORKER", "")


def artifact_path(name: str) -> Path:
    """Where this test process keeps the artifact ``name`` (a service's log, say)."""
    return ARTIFACTS / name


def _sql_flush_by_delete(self: Any, style: Any, tables: list[str], *, reset_sequences: bool = False,
                         allow_cascade: bool = False) -> list[str]:
    """What a committing test's teardown runs to empty PostgreSQL: a DELETE per table instead of
    one TRUNCATE of them all, which gives each of the ~70 tables and their indexes new files
    and takes a third of a second. Triggers (the ledger's append-only one among them) and
    foreign keys are off for the transaction the flush runs in; every table is emptied."""
    if not tables or reset_sequences or not _superuser(self.connection):
        return _truncating_flush(self, style, tables, reset_sequences=reset_sequences,
                                 allow_cascade=allow_cascade)
    return ["SET LOCAL session_replication_role = replica",
            *(f"DELETE FROM {self.quote_name(table)}" for table in tables)]


def _superuser(connection: Any) -> bool:
    """Whether the test role may turn triggers off (session_replication_role); if not, the
    flush stays Django's TRUNCATE."""
    if not hasattr(connection, "_switchboard_superuser"):
        with connection.cursor() as cursor:
            cursor.execute("SHOW is_superuser")
            connection._switchboard_superuser = cursor.fetchone()[0] == "on"
    return connection._switchboard_superuser


if POSTGRES:
    from django.db.backends.postgresql.operations import DatabaseOperations

    _truncating_flush = DatabaseOperations.sql_flush
    DatabaseOperations.sql_flush = _sql_flush_by_delete  # type: ignore[method-assign]


def _scanned_once(scan: Callable[..., None]) -> Callable[..., None]:
    """WhiteNoise's scan of the static files, done once per test process and settings. Django's
    test client builds the middleware again for every client (every test), and each build
    stat'ed and described the ~180 static files again. The files do not change while the
    tests run."""
    scanned: dict[Any, dict[str, Any]] = {}

    def remembered(self: Any, *args: Any) -> None:
        key = (args, repr(sorted((name, getattr(settings, name)) for name in dir(settings)
                                 if name.startswith(("WHITENOISE_", "STATIC")) or name in {
                                     "DEBUG", "STORAGES", "FORCE_SCRIPT_NAME",
                                     "INSTALLED_APPS"})))
        if key not in scanned:
            before = dict(self.files)
            scan(self, *args)
            scanned[key] = {url: f for url, f in self.files.items() if before.get(url) is not f}
        self.files.update(scanned[key])

    return remembered


from whitenoise.middleware import WhiteNoiseMiddleware  # noqa: E402

WhiteNoiseMiddleware.update_files_dictionary = _scanned_once(  # type: ignore[method-assign]
    WhiteNoiseMiddleware.update_files_dictionary)
WhiteNoiseMiddleware.add_files_from_finders = _scanned_once(  # type: ignore[method-assign]
    WhiteNoiseMiddleware.add_files_from_finders)


def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


def _unreachable_services() -> list[str]:
    missing = []
    if POSTGRES:
        db = settings.DATABASES["default"]
        host, port = db.get("HOST") or "127.0.0.1", int(db.get("PORT") or 5432)
        if not _reachable(host, port):
            missing.append(f"PostgreSQL at {host}:{port}")
    if DISTRIBUTED:
        parts = urlsplit(settings.REDIS_URL)
        host, port = parts.hostname or "127.0.0.1", parts.port or 6379
        if not _reachable(host, port):
            missing.append(f"Redis at {host}:{port}")
    return missing


def pytest_report_header(config: pytest.Config) -> str:
    db = settings.DATABASES["default"]["ENGINE"].rsplit(".", 1)[-1]
    return f"switchboard mode: {settings.SWITCHBOARD_MODE}, database: {db}"


class _FaultsFirst:
    """Runs the fault scenarios first (after pytest-django has put its database tests in their
    order, and the scenarios, which use no test database, last). xdist's ``worksteal`` gives
    each process a share of the tests in this order, and a process that runs out takes tests
    from the end of another's share: the scenarios (two minutes, the longest file by far) start
    at once on the first process, in one cluster of services (tests/test_faults.py's module
    fixture), rather than running last, where the processes that run out would split them and
    each start a cluster of its own."""

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, items: list[pytest.Item]) -> None:
        items.sort(key=lambda item: item.nodeid.split("::")[0] != "tests/test_faults.py")


def pytest_configure(config: pytest.Config) -> None:
    config.pluginmanager.register(_FaultsFirst(), "switchboard-faults-first")


@pytest.hookimpl(tryfirst=True)  # before -m selects: the browser mark is given here
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        names = getattr(item, "fixturenames", None)
        if names is not None and "browser" in names:
            item.add_marker(pytest.mark.browser)
        # Instantiated first (see _fillfixtures): the shared demo's transaction must be open
        # before the test's own atomic block, which becomes a savepoint inside it.
        if names is not None and "demo" in names and _rolls_back(item) and SHARED not in names:
            names.insert(0, SHARED)
    missing = _unreachable_services()
    if missing:
        message = "unreachable: " + ", ".join(missing)
        if REQUIRE_SERVICES:
            raise pytest.UsageError(f"SWITCHBOARD_REQUIRE_SERVICES is set but {message}")
        skip_all = pytest.mark.skip(reason=f"distributed pass skipped, {message}")
        for item in items:
            item.add_marker(skip_all)
        return
    for item in items:
        if "distributed" in item.keywords and not DISTRIBUTED:
            item.add_marker(pytest.mark.skip(
                reason="runs in the distributed pass (PostgreSQL + Redis + Celery worker)"))
        if "postgres" in item.keywords and not POSTGRES:
            item.add_marker(pytest.mark.skip(reason="needs PostgreSQL (the distributed pass)"))


@pytest.fixture(autouse=True)
def _drain_worker_pool() -> Iterator[None]:
    """Standalone work runs on threads: let it finish before the test's database goes away."""
    yield
    from orchestration import dispatch

    dispatch.shutdown(wait=True)


def _seed_demo() -> None:
    from django.core.management import call_command

    from tests import demo_snapshot

    demo_snapshot.seed(lambda: call_command("seed_demo", stdout=open(os.devnull, "w")))


def _rolls_back(item: pytest.Item) -> bool:
    """Whether the test runs inside a transaction rolled back afterwards (pytest-django's ``db``),
    as opposed to committing (``transactional_db``, ``live_server``): the ordering rule of
    pytest-django, which runs every test of the first kind before any of the second."""
    marker = item.get_closest_marker("django_db")
    if marker is not None and (marker.kwargs.get("transaction")
                               or marker.kwargs.get("reset_sequences")):
        return False
    names = getattr(item, "fixturenames", ())
    return not ({"transactional_db", "live_server", "runner"} & set(names))


SHARED = "_shared_demo"


class _DemoTransaction:
    """The demo, seeded once for one module's rolled-back tests, in a transaction undone when the
    next test is of another module or commits: each test's atomic block is a savepoint in it,
    so every test still meets the freshly seeded demo."""

    def __init__(self) -> None:
        self.module: str | None = None
        self.block: Any = None

    def open(self, module: str) -> None:
        from django.db import transaction

        if self.module == module:
            return
        self.close()
        block = transaction.atomic()
        block.__enter__()
        try:
            _seed_demo()
        except BaseException:
            transaction.set_rollback(True)
            block.__exit__(None, None, None)
            raise
        self.module, self.block = module, block

    def close(self) -> None:
        from django.db import transaction

        if self.block is not None:
            transaction.set_rollback(True)
            self.block.__exit__(None, None, None)
            self.module = self.block = None
            from tests.demo_snapshot import forget_what_ids_named

            forget_what_ids_named()  # a restored demo's ids are gone again


_demo_transaction = _DemoTransaction()


@pytest.fixture(scope="session")
def _demo_holder(django_db_setup: Any, django_db_blocker: Any) -> Iterator[_DemoTransaction]:
    """Closes the shared demo's transaction before the test database is dropped."""
    yield _demo_transaction
    with django_db_blocker.unblock():
        _demo_transaction.close()


@pytest.fixture
def _shared_demo(request: pytest.FixtureRequest, _demo_holder: _DemoTransaction,
                 django_db_blocker: Any) -> None:
    with django_db_blocker.unblock():
        _demo_holder.open(request.module.__name__)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    try:
        result = yield
        holder = _demo_transaction
        if holder.block is not None and not (
                nextitem is not None and SHARED in getattr(nextitem, "fixturenames", ())
                and nextitem.module.__name__ == holder.module):  # type: ignore[attr-defined]
            from pytest_django.plugin import blocking_manager_key

            with item.config.stash[blocking_manager_key].unblock():
                holder.close()
        return result
    finally:  # after the ORM calls above, which need Chromium's variable while it runs
        if CHROMIUM_SESSION.browser is not None and (
                nextitem is None or nextitem.get_closest_marker("browser") is None):
            CHROMIUM_SESSION.stop()


@pytest.fixture
def demo(request: pytest.FixtureRequest, db: Any) -> None:
    """The demo's processes, agents, tools and people (seed_demo). Tests that roll back share
    one seeding per module (see _DemoTransaction); tests that commit seed their own."""
    if SHARED not in request.fixturenames:
        _seed_demo()


@pytest.fixture
def operator(demo: None) -> Any:
    from django.contrib.auth.models import User

    return User.objects.get(username="operator")


@pytest.fixture
def api_token(operator: Any) -> str:
    from console.models import ApiToken

    return ApiToken.issue(operator, name="tests")[1]


@pytest.fixture
def api(client: Any, api_token: str) -> Any:
    """Django's test client with the operator's bearer token on every request."""

    class Api:
        def get(self, path: str, **kw: Any) -> Any:
            return client.get(path, HTTP_AUTHORIZATION=f"Bearer {api_token}", **kw)

        def post(self, path: str, data: Any = None, **kw: Any) -> Any:
            import json

            return client.post(path, data=json.dumps(data if data is not None else {}),
                               content_type="application/json",
                               HTTP_AUTHORIZATION=f"Bearer {api_token}", **kw)

    return Api()


# The credential "crm" the worker process gets, for tests of credential injection and redaction.
TEST_CRM_SECRET = "crm-secret-7f3a9c2e11"
# The credential "llm": the API key of agents that call a model server.
TEST_LLM_SECRET = "llm-secret-4b8d0e6a52"

VENDOR_INPUT = {"name": "Northwind Traders", "country": "DE",
                "iban": "DE89370400440532013000", "email": "ap@northwind.example"}


@pytest.fixture
def vendor_input() -> dict[str, str]:
    return dict(VENDOR_INPUT)


def wait_for(predicate: Callable[[], Any], *, timeout: float = 30.0, interval: float = 0.05,
             what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


def wait_for_run(run_id: Any, *, timeout: float = 30.0) -> Any:
    from orchestration.engine.states import RUN_TERMINAL
    from orchestration.models import Run

    def ended() -> Any:
        run = Run.objects.get(pk=run_id)
        return run if run.status in RUN_TERMINAL or run.status == "waiting" else None

    return wait_for(ended, timeout=timeout, what=f"run {run_id} to end")


@pytest.fixture
def worker_metrics_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The Celery worker's PROMETHEUS_MULTIPROC_DIR: where it writes its metrics."""
    return tmp_path_factory.mktemp("worker-metrics")


@pytest.fixture
def celery_worker(request: pytest.FixtureRequest, transactional_db: Any) -> Iterator[Any]:
    """A real `celery worker` process against the test database and the test Redis, forked from
    this test process's worker zygote (tests/zygote.py); a test that reads the worker's
    metrics (``worker_metrics_dir``) gets a freshly started one writing them there."""
    if not DISTRIBUTED:
        pytest.skip("needs REDIS_URL (the distributed pass)")
    if "worker_metrics_dir" in request.fixturenames:
        metrics = request.getfixturevalue("worker_metrics_dir")
        with celery_worker_process(
                env_extra={"PROMETHEUS_MULTIPROC_DIR": str(metrics)}) as (proc, _log_path):
            yield proc
        return
    zygote = request.getfixturevalue("_worker_zygote")
    if _settled(_worker_env()) != _settled(zygote.env):  # the test set a variable
        with celery_worker_process() as (proc, _log_path):
            yield proc
        return
    _empty_test_redis()
    log_path = _empty_log("celery-worker.log")
    proc = zygote.fork("celery", _worker_argv(), log_path)
    try:
        _wait_until_ready(proc, log_path)
        yield proc
    finally:
        # The test is over: no need to wait out a shutdown (a second and a half even when
        # idle). What it was still running is abandoned, as after a crash.
        proc.kill()
        proc.wait(timeout=20)


def _empty_log(name: str) -> Path:
    """artifacts/<name>, empty: a zygote's child appends to it."""
    path = artifact_path(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def _empty_test_redis() -> None:
    """Before a worker starts (it declares its queues): nothing of an earlier test is left."""
    import redis

    redis.Redis.from_url(settings.REDIS_URL).flushdb()


def _settled(env: dict[str, str]) -> dict[str, str]:
    """The environment without what pytest changes as each test runs."""
    return {k: v for k, v in env.items() if k != "PYTEST_CURRENT_TEST"}


def _worker_env(env_extra: dict[str, str] | None = None) -> dict[str, str]:
    env = _inherited_env()
    env["DATABASE_URL"] = subprocess_database_url()
    env["REDIS_URL"] = settings.REDIS_URL
    env["SWITCHBOARD_CREDENTIAL_CRM"] = TEST_CRM_SECRET
    env["SWITCHBOARD_CREDENTIAL_LLM"] = TEST_LLM_SECRET
    env.update(env_extra or {})
    return env


def _worker_argv() -> list[str]:
    return ["worker", "--loglevel=INFO", "--concurrency=3", "--pool=threads",
            "--without-gossip", "--without-mingle", "--without-heartbeat",
            "-n", f"test-{os.getpid()}@%h"]


class _Forked:
    """A worker or server a zygote forked (its child, not this process's): what the fixtures use
    of ``subprocess.Popen``."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                os.kill(self.pid, 0)
            except (ProcessLookupError, PermissionError):  # PermissionError: the pid was reused
                self.returncode = -1  # exited and reaped by the zygote; its status is the zygote's
        return self.returncode

    def send_signal(self, signum: int) -> None:
        if self.poll() is None:
            try:
                os.kill(self.pid, signum)
            except ProcessLookupError:
                self.returncode = -1

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(f"worker {self.pid}", timeout or 0)
            time.sleep(0.02)
        return self.returncode or 0


class Zygote:
    """tests/zygote.py with the environment ``env``: forks Celery workers and daphne servers."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.zygote"], cwd=ROOT,
            env=self.env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def fork(self, main: str, argv: list[str], log_path: Path) -> _Forked:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        request = {"main": main, "argv": argv, "log": str(log_path)}
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline()
        if not answer:
            raise AssertionError(f"the zygote exited ({self.proc.wait()})")
        return _Forked(int(answer))

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.fixture(scope="session")
def _worker_zygote(django_db_setup: Any) -> Iterator[Zygote]:
    """Imports the project once per test process; forks each test's Celery worker."""
    zygote = Zygote(_worker_env())
    yield zygote
    zygote.close()


class _Chromium:
    """One headless Chromium for a run of browser tests in a test process (starting one takes
    most of a second): each test opens its own contexts (cookies, storage, pages) in it, closed
    when the test ends (tests/test_browser.py's ``browser``). It is stopped after the last
    browser test of a run of them (``pytest_runtest_teardown``), so the tests after it find the
    process as it was.

    Playwright's sync API keeps its event loop marked as running in this thread while it lives,
    and Django refuses ORM calls in a thread with a running loop. The browser tests' fixtures and
    bodies call the ORM between Playwright's calls, never on its loop: for as long as Chromium
    runs, DJANGO_ALLOW_ASYNC_UNSAFE is set in this process. The servers and workers the tests
    start are not given it (_inherited_env)."""

    def __init__(self) -> None:
        self.playwright: Any = None
        self.browser: Any = None

    def get(self) -> Any:
        if self.browser is not None and not self.browser.is_connected():  # it crashed
            self.stop()
        if self.browser is None:
            from playwright.sync_api import sync_playwright

            os.environ[ASYNC_UNSAFE] = "true"
            self.playwright = sync_playwright().start()
            self.browser = self.playwright.chromium.launch(
                executable_path=CHROMIUM, args=["--no-sandbox"])
        return self.browser

    def stop(self) -> None:
        try:
            if self.browser is not None and self.browser.is_connected():
                self.browser.close()
        finally:
            self.browser = None
            if self.playwright is not None:
                self.playwright.stop()
                self.playwright = None
            os.environ.pop(ASYNC_UNSAFE, None)


CHROMIUM_SESSION = _Chromium()


def _inherited_env() -> dict[str, str]:
    """This process's environment as its servers and workers get it."""
    return {k: v for k, v in os.environ.items() if k != ASYNC_UNSAFE}


def _server_env() -> dict[str, str]:
    env = {k: v for k, v in _inherited_env().items() if k not in {"REDIS_URL", "DATABASE_URL"}}
    env["DATABASE_URL"] = subprocess_database_url()
    if DISTRIBUTED:
        env["REDIS_URL"] = settings.REDIS_URL
    env["SWITCHBOARD_DEMO_PASSWORD"] = settings.SWITCHBOARD_DEMO_PASSWORD
    return env


@pytest.fixture(scope="session")
def _server_zygote(django_db_setup: Any) -> Iterator[Zygote]:
    """Imports the project once per test process; forks each test's daphne server."""
    zygote = Zygote(_server_env())
    yield zygote
    zygote.close()


@contextmanager
def daphne_process(request: pytest.FixtureRequest, argv: list[str], *, log_name: str,
                   ) -> Iterator[tuple[Any, Path]]:
    """``daphne <argv>`` against the test database (and in the distributed pass the test
    Redis), logging to artifacts/<log_name>, stopped (SIGTERM) afterwards: forked from the test
    process's server zygote, or started afresh when the test changed the environment."""
    env = _server_env()
    zygote = request.getfixturevalue("_server_zygote")
    if _settled(env) != _settled(zygote.env):
        with service_process([sys.executable, "-m", "daphne", *argv], env=env,
                             log_name=log_name) as started:
            yield started
        return
    log_path = _empty_log(log_name)
    proc = zygote.fork("daphne", argv, log_path)
    try:
        yield proc, log_path
    finally:
        _stop(proc)


@contextmanager
def celery_worker_process(
    *, log_name: str = "celery-worker.log", error_log_name: str | None = None,
    env_extra: dict[str, str] | None = None,
) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    """Start `celery worker` and wait until it is ready. Its log lines (stderr) go to
    artifacts/<error_log_name> when given, else with its stdout to artifacts/<log_name>; the
    path returned is the file the log lines go to."""
    _empty_test_redis()
    env = _worker_env(env_extra)
    with service_process([sys.executable, "-m", "celery", "-A", "console", *_worker_argv()],
                         env=env, log_name=log_name, error_log_name=error_log_name,
                         ) as (proc, log_path):
        _wait_until_ready(proc, log_path)
        yield proc, log_path


def _wait_until_ready(proc: Any, log_path: Path) -> None:
    wait_for(lambda: b"ready." in log_path.read_bytes() or proc.poll() is not None,
             timeout=60, what="the celery worker to start")
    if proc.poll() is not None:
        raise AssertionError(f"celery worker exited early; see {log_path}")


def subprocess_database_url() -> str:
    """The test database as a ``DATABASE_URL``, for server and worker subprocesses."""
    from django.db import connection

    db = connection.settings_dict
    if db["ENGINE"].endswith("sqlite3"):
        return f"sqlite:///{db['NAME']}"
    auth = db["USER"] + (f":{db['PASSWORD']}" if db["PASSWORD"] else "")
    return f"postgresql://{auth}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}/{db['NAME']}"


@contextmanager
def service_process(args: list[str], *, env: dict[str, str], log_name: str,
                    error_log_name: str | None = None,
                    ) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    """A server or worker subprocess logging to artifacts/<log_name> (its stderr to
    artifacts/<error_log_name> when given), stopped afterwards. The path returned is the one
    stderr goes to."""
    log_path = artifact_path(log_name)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    error_path = artifact_path(error_log_name) if error_log_name else log_path
    with open(log_path, "wb") as log, ExitStack() as stack:
        errors = (stack.enter_context(open(error_path, "wb")) if error_log_name
                  else subprocess.STDOUT)
        proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=log, stderr=errors)
        try:
            yield proc, error_path
        finally:
            _stop(proc)


def _stop(proc: Any) -> None:
    """SIGTERM, and SIGKILL if it has not exited 20 s later."""
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture
def runner(request: pytest.FixtureRequest, transactional_db: Any) -> None:
    """Somewhere for run work to go: a real Celery worker process in the distributed pass, the
    in-process pool in the standalone pass. Tests using it commit, so on_commit dispatch fires."""
    if DISTRIBUTED:
        request.getfixturevalue("celery_worker")


@pytest.fixture
def people(demo: None) -> dict[str, Any]:
    """The demo's people by username."""
    from django.contrib.auth.models import User

    return {u.username: u for u in User.objects.filter(
        username__in=["operator", "reviewer", "reviewer2", "admin"])}


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: Any) -> Iterator[Any]:
    report = yield
    if report.when == "call":
        from tests.faults.report import attach

        attach(report)
    return report


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    from tests.faults.report import collect

    collect(report)


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    """The fault-injection figures (tests/test_faults.py), when that module ran."""
    from tests.faults.report import write_summary

    write_summary(terminalreporter)


@pytest.fixture(scope="session")
def django_db_setup(django_db_setup: Any, django_db_blocker: Any) -> Iterator[None]:
    """pytest-django's, and before it drops the PostgreSQL test database: end the sessions that
    in-process ASGI tests left behind. Their requests ran on asgiref's executor threads, which
    stay idle with their connections open, and the drop refuses a database still in use."""
    yield
    from django.db import connection

    if connection.vendor == "postgresql":
        with django_db_blocker.unblock():
            with connection.cursor() as cursor:
                cursor.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                               " WHERE datname = current_database() AND pid <> pg_backend_pid()")
            connection.close()  # nor this one: the drop would refuse it too
