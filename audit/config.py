"""Configuration changes as ledger events: who changed what, from which values to which.

Every change to agents, tools, grants, prices, processes, policies and roles is one event on the
configuration chain, appended in the same transaction as the change, so a change that rolls back
leaves no event and an event never describes a change that did not happen."""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from datetime import date, datetime
from decimal import Decimal
from typing import Any

from django.contrib.auth.models import AbstractBaseUser
from django.db import models, transaction

from audit import ledger
from audit.ledger import CONFIG_CHAIN, actor_of
from audit.models import Event

# Never copied into the ledger: secrets and values that change on their own.
SKIPPED_FIELDS = frozenset({"password", "last_login", "digest"})


def _plain(value: Any) -> Any:
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, models.Model):
        return str(value)
    return value


def snapshot(obj: models.Model, *, exclude: Iterable[str] = ()) -> dict[str, Any]:
    """The object's editable values, JSON-ready: fields by value, relations by name."""
    skipped = SKIPPED_FIELDS | set(exclude)
    data: dict[str, Any] = {}
    for field in obj._meta.concrete_fields:
        if field.name in skipped or field.primary_key:
            continue
        if field.is_relation:
            related = getattr(obj, field.name, None)
            data[field.name] = str(related) if related is not None else None
        else:
            data[field.name] = _plain(field.value_from_object(obj))
    if obj.pk is not None:
        for field in obj._meta.many_to_many:
            if field.name in skipped:
                continue
            data[field.name] = sorted(str(o) for o in getattr(obj, field.name).all())
    return data


def diff(old: dict[str, Any], new: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Only the keys whose values differ, as (old, new)."""
    keys = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    return ({k: old[k] for k in keys if k in old}, {k: new[k] for k in keys if k in new})


def label(obj: models.Model) -> str:
    return str(getattr(obj, "slug", None) or getattr(obj, "username", None) or obj)


def record(what: str, *, model: str, object: str, old: dict[str, Any], new: dict[str, Any],
           by: AbstractBaseUser | None, **extra: Any) -> Event | None:
    """Append ``config.<what>`` with the changed values only; nothing if nothing changed.

    Must run inside the transaction that makes the change."""
    old, new = diff(old, new)
    if not old and not new:
        return None
    if not transaction.get_connection().in_atomic_block:
        raise RuntimeError("configuration events must be written inside the change's transaction")
    data = {"model": model, "object": object, "old": old, "new": new, **extra}
    return ledger.append(CONFIG_CHAIN, f"config.{what}", data, actor=actor_of(by))


def model_label(obj: models.Model | type[models.Model]) -> str:
    return obj._meta.label_lower


class AuditedAdmin:
    """A ModelAdmin mixin: creating, changing and deleting an object, and changing its
    django-guardian object permissions, each write one ``config.<what>.<action>`` event.

    The admin's change and delete views run in ``transaction.atomic``, so the event commits or
    rolls back with the change. Old values are read in ``save_model`` and new ones after
    ``save_related``, so many-to-many fields (a group's permissions, a person's groups) count."""

    audit_what = ""
    audit_exclude: tuple[str, ...] = ()

    def _what(self, obj: models.Model) -> str:
        return self.audit_what or obj._meta.model_name or "object"

    def _values(self, obj: models.Model) -> dict[str, Any]:
        return snapshot(obj, exclude=self.audit_exclude)

    def save_model(self, request: Any, obj: models.Model, form: Any, change: bool) -> None:
        old = {}
        if change:
            old = self._values(type(obj)._default_manager.get(pk=obj.pk))
        request._config_audit = (old, change)
        super().save_model(request, obj, form, change)  # type: ignore[misc]

    def save_related(self, request: Any, form: Any, formsets: Any, change: bool) -> None:
        super().save_related(request, form, formsets, change)  # type: ignore[misc]
        obj = form.instance
        old, changed = getattr(request, "_config_audit", ({}, change))
        record(f"{self._what(obj)}.{'change' if changed else 'create'}",
               model=model_label(obj), object=label(obj), old=old, new=self._values(obj),
               by=request.user)

    def delete_model(self, request: Any, obj: models.Model) -> None:
        with transaction.atomic():
            old, name = self._values(obj), label(obj)
            super().delete_model(request, obj)  # type: ignore[misc]
            record(f"{self._what(obj)}.delete", model=model_label(obj), object=name, old=old,
                   new={}, by=request.user)

    def delete_queryset(self, request: Any, queryset: Any) -> None:
        with transaction.atomic():
            for obj in queryset:
                self.delete_model(request, obj)

    # django-guardian's object permission pages (GuardedModelAdmin) --------------------------
    def obj_perms_manage_user_view(self, request: Any, object_pk: Any, user_id: Any) -> Any:
        from django.contrib.auth import get_user_model
        from guardian.shortcuts import get_user_perms

        grantee = get_user_model().objects.filter(pk=user_id).first()
        return self._audited_perms(request, object_pk, grantee, get_user_perms,
                                   lambda: super(AuditedAdmin, self).obj_perms_manage_user_view(
                                       request, object_pk, user_id),
                                   actor_of(grantee) if grantee else "")

    def obj_perms_manage_group_view(self, request: Any, object_pk: Any, group_id: Any) -> Any:
        from django.contrib.auth.models import Group
        from guardian.shortcuts import get_group_perms

        grantee = Group.objects.filter(pk=group_id).first()
        return self._audited_perms(request, object_pk, grantee, get_group_perms,
                                   lambda: super(AuditedAdmin, self).obj_perms_manage_group_view(
                                       request, object_pk, group_id),
                                   f"group:{grantee.name}" if grantee else "")

    def _audited_perms(self, request: Any, object_pk: Any, grantee: Any, read: Any, view: Any,
                       who: str) -> Any:
        from django.core.exceptions import ValidationError

        try:
            obj = self.get_queryset(request).filter(pk=object_pk).first()  # type: ignore[attr-defined]
        except (ValidationError, ValueError):
            obj = None
        if obj is None or grantee is None:
            return view()  # the view answers 404 itself
        with transaction.atomic():
            old = sorted(read(grantee, obj))
            response = view()
            record("grant", model=model_label(obj), object=label(obj), grantee=who,
                   old={"perms": old}, new={"perms": sorted(read(grantee, obj))},
                   by=request.user)
        return response
