"""``seed_demo``: create the demo people, tools and processes (safe to run again)."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from django.conf import settings
from django.contrib.auth.models import Group, Permission, User
from django.core.management.base import BaseCommand
from django.db import transaction

from approvals.models import Policy
from approvals.services import policy_publish
from orchestration import demo, grants, services
from orchestration.builtin_tools import registry
from orchestration.models import Agent, ModelPrice, Process, Tool
from orchestration.signals import demo_seeded

# Model permissions of each role. The operator role may start (and so see and cancel) runs of
# every process; a person outside it gets per-process `start_run` object permissions instead.
# What a reviewer may decide is named by each policy's decider group.
ROLE_PERMISSIONS = {
    "operator": ["orchestration.start_run", "orchestration.add_run",
                 "orchestration.view_process"],
    "reviewer": ["orchestration.view_run", "orchestration.view_process",
                 "approvals.view_approvalrequest", "approvals.add_decision",
                 "approvals.view_policy"],
}
# Admins configure everything: every permission of these apps (the demo admin is also a superuser).
ADMIN_APPS = ["orchestration", "approvals", "audit", "console", "auth", "guardian"]
PEOPLE = [
    ("operator", "operator", False),
    ("reviewer", "reviewer", False),
    ("reviewer2", "reviewer", False),
    ("admin", "admin", True),
]
RISK = {"issue_refund": "financial", "run_python": "compliance", "send_customer_email": "write",
        "create_vendor_record": "write", "notify_procurement": "write",
        "check_sanctions": "compliance"}
# Calls per run: a search is cheap, but an agent looping on it is not.
QUOTA_PER_RUN = {"search_knowledge": 10}


def _perm(label: str) -> Permission:
    app, codename = label.split(".")
    return Permission.objects.get(content_type__app_label=app, codename=codename)


class Command(BaseCommand):
    help = "Create the demo people, tools and processes (safe to run again)."

    @transaction.atomic
    def handle(self, *args: Any, **options: Any) -> None:
        password = settings.SWITCHBOARD_DEMO_PASSWORD
        for role, perms in ROLE_PERMISSIONS.items():
            group, _ = Group.objects.get_or_create(name=role)
            group.permissions.set([_perm(p) for p in perms])
        admins, _ = Group.objects.get_or_create(name="admin")
        admins.permissions.set(Permission.objects.filter(content_type__app_label__in=ADMIN_APPS))
        for username, role, is_admin in PEOPLE:
            user, created = User.objects.get_or_create(username=username)
            if created:
                user.set_password(password)
            user.email = f"{username}@switchboard.example"
            user.is_staff = is_admin
            user.is_superuser = is_admin
            user.save()
            user.groups.add(Group.objects.get(name=role))

        for name in registry.names():
            contract = registry.get(name)
            Tool.objects.update_or_create(
                slug=name,
                defaults={
                    "name": name.replace("_", " ").capitalize(),
                    "description": contract.description,
                    "implementation": name,
                    "input_schema": dict(contract.input_schema),
                    "output_schema": dict(contract.output_schema),
                    "timeout_s": contract.timeout_s or 10.0,
                    "idempotent": contract.idempotent,
                    "risk_class": RISK.get(name, "read"),
                    "cost_per_call": Decimal("0.0010") if name == "check_sanctions" else Decimal(0),
                    "quota_per_run": QUOTA_PER_RUN.get(name),
                },
            )

        ModelPrice.objects.update_or_create(
            provider="scripted", model_name=demo.MODEL_NAME,
            defaults={k: Decimal(v) for k, v in demo.PRICES.items()},
        )
        for spec in demo.AGENTS:
            agent = Agent.objects.filter(slug=spec["slug"]).first()
            if agent is None:
                identity, _ = User.objects.get_or_create(
                    username=f"agent-{spec['slug']}", defaults={"is_active": True})
                identity.set_unusable_password()
                identity.save()
                agent = Agent(slug=spec["slug"], user=identity)
            agent.name = spec["name"]
            agent.instructions = spec["instructions"]
            agent.provider = "scripted"
            agent.model_name = demo.MODEL_NAME
            agent.model_params = {"script": spec["script"]}
            agent.save()
            for tool in Tool.objects.all():
                if tool.slug in spec["tools"]:
                    grants.tool_grant(tool=tool, agent=agent, by=None)
                else:
                    grants.tool_revoke(tool=tool, agent=agent, by=None)

        for spec in demo.PROCESSES:
            process, _ = Process.objects.update_or_create(
                slug=spec["slug"],
                defaults={"name": spec["name"], "pattern": spec["pattern"],
                          "description": spec["description"]},
            )
            plan = demo.plan(spec["slug"])
            current = process.current_version
            if current is None or current.plan != plan or current.input_schema != spec[
                    "input_schema"]:
                services.process_publish(process=process, plan=plan,
                                         input_schema=spec["input_schema"])
            grants.grant_plan_tools(process, by=None)

        reviewers = Group.objects.get(name="reviewer")
        for spec in demo.POLICIES:
            policy, _ = Policy.objects.get_or_create(slug=spec["slug"],
                                                     defaults={"name": spec["name"]})
            fields = {"tool": spec["tool"], "risk_class": "", "conditions": spec["conditions"],
                      "decider_group": reviewers, "required_approvals": spec["required"],
                      "deadline_minutes": spec["deadline_minutes"],
                      "on_expiry": spec["on_expiry"],
                      "escalation_group": admins if spec["on_expiry"] == "escalate" else None}
            current = policy.current_version
            if current is None or any(getattr(current, k) != v for k, v in fields.items()):
                policy_publish(policy=policy, **fields)

        # The knowledge base's demo data (its app listens: orchestration does not import it).
        demo_seeded.send(sender=self.__class__, admins=admins)

        self.stdout.write("Demo data is ready. Sign in at http://127.0.0.1:8000/ as:")
        for username, role, _ in PEOPLE:
            self.stdout.write(f"  {username:<10} ({role})  password: {password}")
