"""The query a governed call makes before it runs: stop signals (the run cancelled, a kill
switch, the agent retired) and, for a tool call, the caller's grant on the tool, whether people
were already asked about this call, and which approval policies are in force. One round trip
answers all of them; the gate then asks nothing else of the database unless one of the answers
says it must (orchestration/governance.py)."""

from __future__ import annotations

from collections.abc import Callable
from functools import cache
from typing import Any

from django.contrib.auth import get_user_model
from django.contrib.auth.models import Permission
from django.contrib.contenttypes.models import ContentType
from django.db import connection
from guardian.models import GroupObjectPermission, UserObjectPermission

from approvals import current
from approvals.models import ApprovalRequest
from audit.statements import Prepared
from orchestration.models import Agent, KillSwitch, Run, Tool


@cache
def grant_sql() -> str:
    """Whether %(user)s holds %(perm)s on the %(ct)s object %(obj)s (one row, or none)."""
    user = get_user_model()._meta
    groups = user.get_field("groups").remote_field.through._meta
    return f"""
SELECT 1 FROM {user.db_table} u
 WHERE u.{user.pk.column} = %(user)s AND u.{user.get_field("is_active").column}
   AND (u.{user.get_field("is_superuser").column}
        OR EXISTS (SELECT 1 FROM {UserObjectPermission._meta.db_table} p
                    WHERE p.user_id = u.{user.pk.column} AND p.permission_id = %(perm)s
                      AND p.content_type_id = %(ct)s AND p.object_pk = %(obj)s)
        OR EXISTS (SELECT 1 FROM {GroupObjectPermission._meta.db_table} g
                     JOIN {groups.db_table} ug
                       ON ug.{groups.get_field("group").column} = g.group_id
                    WHERE ug.{groups.get_field("user").column} = u.{user.pk.column}
                      AND g.permission_id = %(perm)s
                      AND g.content_type_id = %(ct)s AND g.object_pk = %(obj)s))
"""




def grant_params(user_id: Any) -> dict[str, Any]:
    """The parameters of ``grant_sql`` but the tool's (``obj``)."""
    ct = ContentType.objects.get_for_model(Tool)
    perm = Permission.objects.get(content_type=ct, codename="invoke_tool").pk
    return {"user": user_id, "perm": perm, "ct": ct.pk}


def grant_checker(user_id: Any, params: dict[str, Any] | None = None) -> Callable[[Tool], bool]:
    """Whether the active user holds ``invoke_tool`` on a tool, directly or through a group,
    as django-guardian grants it. One small query per check (this runs before every call).
    ``params``: ``grant_params(user_id)``, when the caller has them already."""
    params = params if params is not None else grant_params(user_id)

    def holds(tool: Tool) -> bool:
        if user_id is None:
            return False
        with connection.cursor() as cursor:
            cursor.execute(grant_sql(), {**params, "obj": str(tool.pk)})
            return cursor.fetchone() is not None

    return holds


def granted_to(user_id: Any, tools: dict[str, Tool]) -> Callable[[str], bool]:
    """The grant check by tool name. Asked before every call and while one runs, so a
    revoked grant or a deactivated identity stops work at once."""
    holds = grant_checker(user_id)

    def granted(name: str) -> bool:
        tool = tools.get(name)
        return tool is not None and holds(tool)

    return granted


@cache
def _stop_sql(call: bool, vendor: str) -> str:
    user = get_user_model()._meta
    requests = ApprovalRequest._meta
    # For a tool call: the grant (false without a grantee or a tool row), whether any request
    # names the call, and the policies' fingerprint.
    extra = f""",
       EXISTS ({grant_sql()}),
       EXISTS (SELECT 1 FROM {requests.db_table} q
                WHERE q.{requests.get_field("run_id").column} = %(run)s
                  AND q.{requests.get_field("call_key").column} = %(key)s),
       {current.fingerprint_sql()}""" if call else ""
    return f"""
SELECT r.cancel_requested,
       (SELECT k.id
          FROM {KillSwitch._meta.db_table} k
         WHERE k.released_at IS NULL
           AND (k.scope = 'all' OR (k.scope = 'process' AND k.target = %(process)s)
                OR (k.scope = 'agent' AND k.target = %(agent)s)
                OR (k.scope = 'tool' AND k.target = %(tool)s))
         ORDER BY k.engaged_at LIMIT 1),
       (SELECT CASE WHEN a.status = 'active' AND u.{user.get_field("is_active").column}
                    THEN 1 ELSE 0 END
          FROM {Agent._meta.db_table} a JOIN {user.db_table} u
            ON u.{user.pk.column} = a.user_id
         WHERE a.slug = %(agent)s){extra}
  FROM {Run._meta.db_table} r WHERE r.id = %(run)s
"""


def stop_sql(*, call: bool) -> str:
    """Parameters: run, process, agent, tool; for a call also key and ``grant_sql``'s (user
    None when nobody's grant is asked)."""
    return _stop_sql(call, connection.vendor)


# The PostgreSQL types of the parameters of ``stop_sql`` and ``grant_sql``.
TYPES = {"run": "uuid", "process": "text", "agent": "text", "tool": "text", "key": "text",
         "user": "integer", "perm": "integer", "ct": "integer", "obj": "text"}


@cache
def _stop_statement(call: bool, vendor: str) -> Prepared:
    return Prepared("stop_call" if call else "stop", _stop_sql(call, vendor), TYPES)


def stop_statement(*, call: bool) -> Prepared:
    """``stop_sql``, planned once per connection."""
    return _stop_statement(call, connection.vendor)
