"""Credentials leave the environment once settings hold them: processes the server starts do
not inherit them, and /proc/<pid>/environ of the server no longer shows them."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.conftest import ROOT

SECRET = "demo-credential-8c41d2f7e9"

_SERVER = """
import json, os, subprocess
from django.conf import settings

held = settings.SWITCHBOARD_CREDENTIALS.get("demo")
child = subprocess.run(["env"], capture_output=True, text=True).stdout
print(json.dumps({
    "held": held,
    "os_environ": sorted(k for k in os.environ if k.startswith("SWITCHBOARD_CREDENTIAL_")),
    "proc_environ": open(f"/proc/{os.getpid()}/environ", "rb").read().decode(),
    "child": child,
    "other": os.environ.get("SWITCHBOARD_OTHER"),
}))
"""


def _start(*argv: str) -> dict:
    env = {"PATH": os.environ["PATH"], "DJANGO_SETTINGS_MODULE": "console.settings",
           "SECRET_KEY": os.environ["SECRET_KEY"],  # set by tests/settings.py
           "SWITCHBOARD_CREDENTIAL_DEMO": SECRET, "SWITCHBOARD_OTHER": "kept"}
    done = subprocess.run([sys.executable, *argv], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_server_holds_credentials_only_in_memory() -> None:
    seen = _start("-c", _SERVER)
    assert seen["held"] == SECRET  # settings still hand it to the code that needs it
    assert seen["os_environ"] == []
    assert SECRET not in seen["child"]  # a subprocess does not inherit it
    assert "SWITCHBOARD_CREDENTIAL_DEMO" not in seen["proc_environ"]
    assert SECRET not in seen["proc_environ"]
    assert seen["other"] == "kept"  # other variables are left alone
    assert "SWITCHBOARD_OTHER=kept" in seen["proc_environ"]
