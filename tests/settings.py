"""Django settings for the test suite: the deployment's own (console/settings.py) with a secret
key of this test run's, since DEBUG is off and the public development key is refused.

The key goes into the environment before console.settings reads it, so the servers and workers
the tests start as subprocesses (which inherit it) sign sessions with the same key."""

import os
import secrets

os.environ.setdefault("SECRET_KEY", f"tests-{secrets.token_urlsafe(40)}")

from console.settings import *  # noqa: E402, F403
