"""Django settings for the test suite: the deployment's own (console/settings.py) with a secret
key of this test run's, since DEBUG is off and the public development key is refused.

The key goes into the environment before console.settings reads it, so the servers and workers
the tests start as subprocesses (which inherit it) sign sessions with the same key."""

import os
import secrets
from urllib.parse import urlsplit, urlunsplit

os.environ.setdefault("SECRET_KEY", f"tests-{secrets.token_urlsafe(40)}")


def _redis_url_of_this_worker(url: str, worker: str) -> str:
    """Under pytest-xdist, worker gwN takes the Redis database N below the one given (mod 16): a
    test flushing its broker and channel layer touches no other worker's."""
    parts = urlsplit(url)
    base = int(parts.path.strip("/") or 0)
    return urlunsplit(parts._replace(path=f"/{(base - int(worker.removeprefix('gw'))) % 16}"))


# Servers and workers the tests start inherit both variables: the marker keeps them on the
# database already chosen.
_worker = os.environ.get("PYTEST_XDIST_WORKER", "")
_shifted = os.environ.get("SWITCHBOARD_TEST_REDIS_OF") == _worker
if _worker and os.environ.get("REDIS_URL") and not _shifted:
    os.environ["REDIS_URL"] = _redis_url_of_this_worker(os.environ["REDIS_URL"], _worker)
    os.environ["SWITCHBOARD_TEST_REDIS_OF"] = _worker

from console.settings import *  # noqa: E402, F403

# The deployment's hasher is slow on purpose; the suite's passwords are throwaway, and seeding the
# demo hashes four of them per test. Servers and workers started with these settings verify them.
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
