"""Sockets follow access. When a person's access may have narrowed (deactivated or deleted, a new
password, taken out of a group, a model or object permission taken from them or from a group they
are in) their open sockets are told to re-check it: an `access.revoked` message to their user
group once the change commits (console.consumers closes what they may no longer see).

The change is made by an admin's request, a shell or a worker, seldom by the process holding the
socket, so the message goes through the channel layer. It is the fast path only: every push
re-reads the user and their permission as well, so a lost message, or a change that sends no
signal (QuerySet.update), takes effect at that socket's next push."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from django.contrib.auth import get_user_model
from django.contrib.auth.hashers import is_password_usable
from django.contrib.auth.models import Group
from django.db import transaction
from django.db.models.signals import m2m_changed, post_save, pre_delete, pre_save

from console import live

# Rows about to go. The related managers run these inside their own transaction and revoke()
# waits for its commit, so who is affected is read while the rows are still there.
REMOVING = frozenset({"pre_remove", "pre_clear"})
# The user's own fields that can narrow what they may see: a flag going from True to False, or
# any new password. Their values before a save are kept on the instance under _BEFORE.
NARROWING = ("is_active", "is_superuser", "password")
_BEFORE = "_socket_access_before"


def revoke(user_ids: Iterable[int], *, using: str) -> None:
    """Have these people's open sockets re-check their access once the change commits."""
    ids = sorted(set(user_ids))
    if not ids:
        return

    def send() -> None:
        for pk in ids:
            live.send(live.user_group(pk), {"type": "access.revoked"})

    transaction.on_commit(send, using=using, robust=True)


def _members(group_ids: Iterable[int]) -> list[int]:
    return list(get_user_model()._default_manager.filter(groups__in=list(group_ids))
                .values_list("pk", flat=True))


def on_user_saving(sender: Any, instance: Any, raw: bool, using: str,
                   update_fields: frozenset[str] | None = None, **_: Any) -> None:
    """Read what the row held before the save, for on_user_saved to compare (a sign-in saves
    only `last_login`: no query then)."""
    fields = [f for f in NARROWING if update_fields is None or f in update_fields]
    if raw or instance.pk is None or not fields:
        return
    instance.__dict__[_BEFORE] = (sender._default_manager.using(using)
                                  .filter(pk=instance.pk).values(*fields).first())


def on_user_saved(sender: Any, instance: Any, using: str, **_: Any) -> None:
    """Deactivated, no longer a superuser, or a new password (which ends their other sessions):
    a change that only widens access, or touches none of these, tells no one."""
    before = instance.__dict__.pop(_BEFORE, None)
    if before and _narrowed(before, instance):
        revoke([instance.pk], using=using)


def _narrowed(before: dict[str, Any], user: Any) -> bool:
    # A first password, where none could be used to sign in, takes nothing away.
    old_password = before.get("password")
    if old_password and is_password_usable(old_password) and old_password != user.password:
        return True
    return any(before[f] and not getattr(user, f) for f in before if f != "password")


def on_user_deleted(sender: Any, instance: Any, using: str, **_: Any) -> None:
    revoke([instance.pk], using=using)


def on_group_changed(sender: Any, instance: Any, using: str, created: bool = False,
                     **_: Any) -> None:
    """A group renamed (roles go by name) or deleted (its members leave it with no m2m signal)."""
    if not created:
        revoke(_members([instance.pk]), using=using)


def on_membership_changed(sender: Any, instance: Any, action: str, reverse: bool,
                          pk_set: set[int] | None, using: str, **_: Any) -> None:
    """User.groups from either side: user.groups.remove/set/clear, group.user_set.remove/…"""
    if action not in REMOVING:
        return
    if not reverse:
        revoke([instance.pk], using=using)
    else:
        revoke(pk_set if pk_set is not None else _members([instance.pk]), using=using)


def on_user_permissions_changed(sender: Any, instance: Any, action: str, reverse: bool,
                                pk_set: set[int] | None, using: str, **_: Any) -> None:
    """User.user_permissions from either side (instance is a user, or a permission)."""
    if action not in REMOVING:
        return
    if not reverse:
        revoke([instance.pk], using=using)
    elif pk_set is not None:
        revoke(pk_set, using=using)
    else:
        revoke(get_user_model()._default_manager.filter(user_permissions=instance)
               .values_list("pk", flat=True), using=using)


def on_group_permissions_changed(sender: Any, instance: Any, action: str, reverse: bool,
                                 pk_set: set[int] | None, using: str, **_: Any) -> None:
    """Group.permissions from either side (instance is a group, or a permission): every member
    of the groups concerned."""
    if action not in REMOVING:
        return
    if not reverse:
        groups: Iterable[int] = [instance.pk]
    else:
        groups = pk_set if pk_set is not None else (
            Group.objects.filter(permissions=instance).values_list("pk", flat=True))
    revoke(_members(groups), using=using)


def on_user_object_permission_deleted(sender: Any, instance: Any, using: str,
                                      **_: Any) -> None:
    revoke([instance.user_id], using=using)


def on_group_object_permission_deleted(sender: Any, instance: Any, using: str,
                                       **_: Any) -> None:
    revoke(_members([instance.group_id]), using=using)


def connect() -> None:
    """Hook the receivers up (ConsoleConfig.ready). Deletions are caught before the rows go
    (pre_delete), while a group's members can still be read."""
    from guardian.utils import get_group_obj_perms_model, get_user_obj_perms_model

    user = get_user_model()
    pre_save.connect(on_user_saving, sender=user, dispatch_uid="socket_access.user_saving")
    post_save.connect(on_user_saved, sender=user, dispatch_uid="socket_access.user")
    pre_delete.connect(on_user_deleted, sender=user, dispatch_uid="socket_access.user_deleted")
    post_save.connect(on_group_changed, sender=Group, dispatch_uid="socket_access.group")
    pre_delete.connect(on_group_changed, sender=Group,
                       dispatch_uid="socket_access.group_deleted")
    m2m_changed.connect(on_membership_changed, sender=user.groups.through,
                        dispatch_uid="socket_access.membership")
    m2m_changed.connect(on_user_permissions_changed, sender=user.user_permissions.through,
                        dispatch_uid="socket_access.user_permissions")
    m2m_changed.connect(on_group_permissions_changed, sender=Group.permissions.through,
                        dispatch_uid="socket_access.group_permissions")
    pre_delete.connect(on_user_object_permission_deleted, sender=get_user_obj_perms_model(),
                       dispatch_uid="socket_access.user_object_permission")
    pre_delete.connect(on_group_object_permission_deleted, sender=get_group_obj_perms_model(),
                       dispatch_uid="socket_access.group_object_permission")
