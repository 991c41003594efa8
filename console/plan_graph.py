"""A run's task graph drawn server-side as SVG: tasks in layers by dependency depth, edges from
each dependency to its dependant, nodes classed by status (console.css colours them). No script
and no inline style, so the page's CSP stays as it is; every label is escaped."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from html import escape
from typing import Any

from django.utils.safestring import SafeString, mark_safe

NODE_W, NODE_H = 168, 44
GAP_X, GAP_Y = 56, 18
PAD = 8
MAX_LABEL = 22


@dataclass(frozen=True, slots=True)
class Node:
    key: str
    status: str
    depends_on: tuple[str, ...]
    label: str = ""
    # The task that delegated this one (engine/delegation.py): drawn as a dashed edge.
    delegated_by: str = ""


def _layers(nodes: Sequence[Node]) -> dict[str, int]:
    """Each task's layer: one more than its deepest dependency (unknown ones are ignored)."""
    keys = {n.key for n in nodes}
    depth: dict[str, int] = {}
    by_key = {n.key: n for n in nodes}

    def visit(key: str, seen: frozenset[str]) -> int:
        if key in depth:
            return depth[key]
        node = by_key[key]
        deps = [d for d in (*node.depends_on, *filter(None, [node.delegated_by]))
                if d in keys and d not in seen]
        depth[key] = 1 + max((visit(d, seen | {key}) for d in deps), default=-1)
        return depth[key]

    for n in nodes:
        visit(n.key, frozenset())
    return depth


def _short(text: str) -> str:
    return text if len(text) <= MAX_LABEL else text[:MAX_LABEL - 1] + "…"


def plan_svg(nodes: Iterable[Node], *, title: str = "Task graph") -> SafeString:
    """The SVG of the graph (an empty string for no tasks)."""
    nodes = list(nodes)
    if not nodes:
        return mark_safe("")
    depth = _layers(nodes)
    columns: dict[int, list[Node]] = {}
    for n in nodes:
        columns.setdefault(depth[n.key], []).append(n)
    place: dict[str, tuple[int, int]] = {}
    for layer, members in columns.items():
        for row, n in enumerate(members):
            place[n.key] = (PAD + layer * (NODE_W + GAP_X), PAD + row * (NODE_H + GAP_Y))
    width = PAD * 2 + (max(columns) + 1) * NODE_W + max(columns) * GAP_X
    height = PAD * 2 + max(len(m) for m in columns.values()) * (NODE_H + GAP_Y) - GAP_Y
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" class="plan-graph" role="img" '
             f'viewBox="0 0 {width} {height}" width="{width}" height="{height}" '
             f'aria-labelledby="plan-graph-title"><title id="plan-graph-title">'
             f'{escape(title)}</title>',
             '<defs><marker id="plan-arrow" viewBox="0 0 10 10" refX="10" refY="5" '
             'markerWidth="7" markerHeight="7" orient="auto-start-reverse">'
             '<path d="M 0 0 L 10 5 L 0 10 z" class="plan-arrow"/></marker></defs>']
    for n in nodes:
        x2, y2 = place[n.key]
        for dep in n.depends_on:
            if dep not in place:
                continue
            x1, y1 = place[dep]
            sx, sy, ex, ey = x1 + NODE_W, y1 + NODE_H // 2, x2, y2 + NODE_H // 2
            mid = (sx + ex) // 2
            parts.append(f'<path class="plan-edge" d="M {sx} {sy} C {mid} {sy}, {mid} {ey}, '
                         f'{ex} {ey}" marker-end="url(#plan-arrow)"/>')
        if n.delegated_by in place:
            x1, y1 = place[n.delegated_by]
            sx, sy, ex, ey = x1 + NODE_W, y1 + NODE_H // 2, x2, y2 + NODE_H // 2
            mid = (sx + ex) // 2
            parts.append(f'<path class="plan-edge plan-delegation" d="M {sx} {sy} C {mid} '
                         f'{sy}, {mid} {ey}, {ex} {ey}" marker-end="url(#plan-arrow)">'
                         f'<title>{escape(n.delegated_by)} delegated {escape(n.key)}</title>'
                         '</path>')
    for n in nodes:
        x, y = place[n.key]
        status = escape(n.status)
        parts.append(
            f'<g class="plan-node status-{status}" id="plan-node-{escape(n.key)}">'
            f'<title>{escape(n.key)}: {status}</title>'
            f'<rect x="{x}" y="{y}" width="{NODE_W}" height="{NODE_H}" rx="6"/>'
            f'<text x="{x + 10}" y="{y + 18}" class="plan-key">{escape(_short(n.key))}</text>'
            f'<text x="{x + 10}" y="{y + 35}" class="plan-sub">'
            f'{escape(_short(n.label or n.status))}</text></g>')
    parts.append("</svg>")
    return mark_safe("".join(parts))  # noqa: S308 - every interpolated text is escaped above


def nodes_of(tasks: Iterable[Any], delegated: dict[str, str] | None = None) -> list[Node]:
    """Nodes from task rows (key, status, depends_on, executor_type, executor_ref);
    ``delegated`` names the task that delegated each delegated task."""
    delegated = delegated or {}
    return [Node(key=t.key, status=t.status, depends_on=tuple(t.depends_on or ()),
                 label=f"{t.status} · {t.executor_type}",
                 delegated_by=delegated.get(t.key, "")) for t in tasks]
