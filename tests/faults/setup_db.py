"""Prepare a throwaway database (DATABASE_URL): migrate, seed the demo, publish the fault-test
process and print {"operator": token, "reviewer": token} as JSON on the last line."""

from __future__ import annotations

import io
import json
import os
import sys

from tests.faults.tools import (
    PROCESS_INPUT_SCHEMA,
    PROCESS_PLAN,
    PROCESS_SLUG,
    register,
)


def main() -> None:
    register()  # before seed_demo, so the tools get their Tool rows like the built-in ones
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "console.settings")
    import django

    django.setup()
    from django.core.management import call_command

    from orchestration import grants, services
    from orchestration.models import Process

    call_command("migrate", verbosity=0, interactive=False)
    call_command("seed_demo", stdout=io.StringIO())
    process, _ = Process.objects.update_or_create(
        slug=PROCESS_SLUG, defaults={"name": "Fault test: charge", "pattern": "deterministic",
                                     "description": "fault tests"})
    if process.current_version is None:
        services.process_publish(process=process, plan=PROCESS_PLAN,
                                 input_schema=PROCESS_INPUT_SCHEMA)
    grants.grant_plan_tools(process, by=None)
    tokens = {}
    for username in ("operator", "reviewer"):
        out = io.StringIO()
        call_command("create_api_token", username, name="faults", stdout=out,
                     stderr=io.StringIO())
        tokens[username] = out.getvalue().strip().splitlines()[-1]
    sys.stdout.write(json.dumps(tokens) + "\n")


if __name__ == "__main__":
    main()
