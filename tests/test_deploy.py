"""The production start (deploy/): the Dockerfile, compose.yaml and Procfile start the processes
with the commands in scripts/, so the two cannot drift, and compose only sets settings that
console/settings.py reads (and accepts). Docker itself is not needed: the files are read."""

from __future__ import annotations

import ast
import json
import os
import re
import shlex
import subprocess
import sys
from typing import Any

import pytest
import yaml

from tests.conftest import ROOT

DEPLOY = ROOT / "deploy"
# Each process and the script that starts it.
SCRIPTS = {"web": "scripts/serve", "worker": "scripts/worker", "release": "scripts/migrate"}
COMPOSE_APP = {"web": "scripts/serve", "worker": "scripts/worker", "migrate": "scripts/migrate"}


def compose() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of deploy/Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", (DEPLOY / "Dockerfile").read_text())
    instructions = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            instructions.append((word.upper(), rest.strip()))
    return instructions


def exec_line(script: str) -> list[str]:
    """The words of a script's `exec` line (the command it becomes)."""
    lines = [line for line in (ROOT / script).read_text().splitlines()
             if line.startswith("exec ")]
    assert len(lines) == 1, f"{script} has {len(lines)} exec lines"
    return shlex.split(lines[0])[1:]


def settings_read() -> tuple[set[str], set[str]]:
    """The environment variables console/settings.py reads (names, and name prefixes)."""
    tree = ast.parse((ROOT / "console" / "settings.py").read_text())
    names, prefixes = set(), set()
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.args
                and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            if node.func.id == "credentials_take":
                prefixes.add(node.args[0].value)
            elif node.func.id.startswith("env") or node.func.id == "database_from_url":
                names.add(node.args[0].value)
    return names, prefixes


def test_the_scripts_exist_are_executable_and_parse() -> None:
    for script in SCRIPTS.values():
        path = ROOT / script
        assert path.is_file() and os.access(path, os.X_OK), script
        assert path.read_text().startswith("#!/usr/bin/env bash\n"), script
        done = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr


def test_the_scripts_run_what_the_readme_and_the_demo_run() -> None:
    serve = exec_line("scripts/serve")
    demo = exec_line("scripts/demo")
    assert serve[0] == demo[0] == "daphne"
    assert serve[-1] == demo[-1] == "console.asgi:application"
    assert serve[1:5] == ["-b", "0.0.0.0", "-p", "${PORT:-8000}"]
    assert exec_line("scripts/worker")[:4] == ["celery", "-A", "console", "worker"]
    assert exec_line("scripts/migrate") == ["python", "manage.py", "migrate", "--noinput"]


def test_the_dockerfile_builds_a_slim_non_root_image_that_runs_scripts_serve() -> None:
    instructions = dockerfile()
    [base] = [args for word, args in instructions if word == "FROM"]
    assert re.fullmatch(r"python:3\.1[23]-slim", base), base
    runs = [args for word, args in instructions if word == "RUN"]
    assert any("pip install -r /app/requirements.lock" in run for run in runs)
    assert any("manage.py collectstatic --noinput" in run for run in runs)
    users = [args for word, args in instructions if word == "USER"]
    assert users and users[-1] not in {"root", "0", "0:0"}
    last_user = max(i for i, (word, _) in enumerate(instructions) if word == "USER")
    assert all(word != "RUN" for word, _ in instructions[last_user:])  # nothing runs as root after
    [cmd] = [args for word, args in instructions if word == "CMD"]
    assert json.loads(cmd) == [SCRIPTS["web"]]
    assert not [word for word, _ in instructions if word == "ENTRYPOINT"]
    ignored = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    assert {".venv", ".git", ".secret-key", "*.sqlite3"} <= set(ignored)


def test_the_procfile_runs_the_scripts() -> None:
    entries = dict(line.split(":", 1) for line in (DEPLOY / "Procfile").read_text().splitlines()
                   if line.strip() and not line.startswith("#"))
    assert {name: command.strip() for name, command in entries.items()} == SCRIPTS


def test_compose_has_the_services_their_health_and_the_migrate_step() -> None:
    services = compose()["services"]
    assert set(services) == {"postgres", "redis", "migrate", "web", "worker"}
    for name in ("postgres", "redis", "web", "worker"):
        assert services[name]["healthcheck"]["test"], name
    for name, script in COMPOSE_APP.items():
        service = services[name]
        assert service["command"] == [script], name
        assert service["build"] == {"context": "..", "dockerfile": "deploy/Dockerfile"}
        assert {"DATABASE_URL", "REDIS_URL", "SECRET_KEY", "ALLOWED_HOSTS"} <= set(
            service["environment"]), name
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name in ("web", "worker"):
        depends = services[name]["depends_on"]
        assert depends["migrate"]["condition"] == "service_completed_successfully"
        assert depends["redis"]["condition"] == "service_healthy"
    assert "${SECRET_KEY:?" in (DEPLOY / "compose.yaml").read_text()  # from env, never a default


def test_compose_sets_only_settings_console_settings_reads() -> None:
    names, prefixes = settings_read()
    assert {"DATABASE_URL", "REDIS_URL", "SECRET_KEY", "SWITCHBOARD_LOG_FORMAT"} <= names
    for name in COMPOSE_APP:
        for variable in compose()["services"][name]["environment"]:
            assert variable in names or variable.startswith(tuple(prefixes)), (name, variable)


def interpolate(value: str, given: dict[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:-default} and ${VAR:?error}, from ``given``."""
    def one(match: re.Match[str]) -> str:
        name, op, arg = match.group(1), match.group(2), match.group(3) or ""
        if given.get(name):
            return given[name]
        if op == ":?":
            raise AssertionError(f"{name} is required: {arg}")
        return arg

    return re.sub(r"\$\{(\w+)(?:(:-|:\?)([^}]*))?\}", one, value)


def test_compose_s_environment_is_accepted_by_the_settings() -> None:
    given = {"SECRET_KEY": "s" * 50, "POSTGRES_PASSWORD": "pw"}
    environment = compose()["services"]["web"]["environment"]
    env = {k: interpolate(str(v), given) for k, v in environment.items()}
    assert env["DATABASE_URL"] == "postgresql://switchboard:pw@postgres:5432/switchboard"
    with pytest.raises(AssertionError, match="SECRET_KEY is required"):
        interpolate(environment["SECRET_KEY"], {})
    keep = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG")}
    done = subprocess.run(
        [sys.executable, "-c", "from django.conf import settings as s; print(s.SWITCHBOARD_MODE, "
                               "s.SWITCHBOARD_LOG_FORMAT, s.DATABASES['default']['HOST'])"],
        cwd=ROOT, env={**keep, **env, "DJANGO_SETTINGS_MODULE": "console.settings"},
        capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["distributed", "json", "postgres"]
