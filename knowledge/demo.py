"""The knowledge base's demo data, added when ``seed_demo`` runs (orchestration's
``demo_seeded`` signal): the ``refund-policy`` collection the front desk answers from, readable
by the demo agents and the operator and admin groups, writable by the admin group, holding the
refund policy (added once: a version posted since is kept)."""

from __future__ import annotations

from typing import Any

from django.contrib.auth.models import Group

from audit import config as config_audit
from knowledge import services
from knowledge.models import Collection, Document
from orchestration import demo
from orchestration.models import Agent

READERS = ("operator", "admin")
WRITERS = ("admin",)


def _grant(perm: str, grantee: Any, collection: Collection, name: str) -> None:
    from guardian.shortcuts import assign_perm, get_group_perms, get_user_perms

    held = (get_group_perms if isinstance(grantee, Group) else get_user_perms)(grantee,
                                                                                collection)
    codename = perm.split(".")[1]
    if codename in held:
        return
    assign_perm(perm, grantee, collection)
    config_audit.record("grant", model="knowledge.collection", object=collection.slug,
                        grantee=name, old={"perms": sorted(held)},
                        new={"perms": sorted({*held, codename})}, by=None)


def seed(**kwargs: Any) -> None:
    collection, _ = Collection.objects.get_or_create(
        slug=demo.KNOWLEDGE_SLUG,
        defaults={"name": "Refund policy",
                  "description": "The customer refund policy the front desk quotes."})
    for name in READERS:
        _grant("knowledge.read_collection", Group.objects.get(name=name), collection,
               f"group:{name}")
    for name in WRITERS:
        _grant("knowledge.write_collection", Group.objects.get(name=name), collection,
               f"group:{name}")
    for agent in Agent.objects.filter(slug__in=[a["slug"] for a in demo.AGENTS]).select_related(
            "user"):
        _grant("knowledge.read_collection", agent.user, collection, f"agent:{agent.slug}")
    if not Document.objects.filter(collection=collection,
                                   title=demo.REFUND_POLICY_TITLE).exists():
        services.ingest(collection, title=demo.REFUND_POLICY_TITLE, text=demo.REFUND_POLICY,
                        by=None)
