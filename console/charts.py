"""Geometry for the small inline SVG charts: numbers in, numbers out.

Templates draw the shapes from these coordinates; labels stay template text, so autoescaping
applies to every name a chart shows."""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal

WIDTH = 640
HEIGHT = 180
PAD = 24
PALETTE_SIZE = 6
BAR_HEIGHT = 18
BAR_GAP = 6
LABEL_WIDTH = 200


@dataclass(frozen=True)
class Bar:
    label: str
    value: float
    x: float
    y: float
    width: float
    height: float


@dataclass(frozen=True)
class BarChart:
    bars: list[Bar]
    width: int
    height: int
    label_width: int


@dataclass(frozen=True)
class Series:
    label: str
    points: str
    colour: int
    values: list[float] = field(default_factory=list)


@dataclass(frozen=True)
class LineChart:
    series: list[Series]
    ticks: list[tuple[float, str]]
    width: int
    height: int
    top: float
    baseline: float
    max_value: float


def _num(value: float | Decimal | int | None) -> float:
    return float(value or 0)


def bar_chart(items: list[tuple[str, float | Decimal | int]]) -> BarChart:
    """Horizontal bars, one per (label, value), scaled to the largest value."""
    top = max((_num(v) for _, v in items), default=0.0) or 1.0
    span = WIDTH - LABEL_WIDTH - PAD
    bars = [Bar(label=label, value=_num(value), x=LABEL_WIDTH,
                y=i * (BAR_HEIGHT + BAR_GAP), width=round(span * _num(value) / top, 2),
                height=BAR_HEIGHT)
            for i, (label, value) in enumerate(items)]
    height = max(len(bars) * (BAR_HEIGHT + BAR_GAP), BAR_HEIGHT)
    return BarChart(bars=bars, width=WIDTH, height=height, label_width=LABEL_WIDTH)


def line_chart(days: list[str], series: dict[str, list[float | Decimal | int | None]]
               ) -> LineChart:
    """One polyline per series over ``days``; every series has one value per day."""
    values = [_num(v) for vs in series.values() for v in vs]
    top = max(values, default=0.0) or 1.0
    step = (WIDTH - 2 * PAD) / max(len(days) - 1, 1)
    baseline = HEIGHT - PAD

    def y(v: float) -> float:
        return round(baseline - (HEIGHT - 2 * PAD) * v / top, 2)

    lines = []
    for i, (label, vs) in enumerate(series.items()):
        nums = [_num(v) for v in vs]
        points = " ".join(f"{round(PAD + j * step, 2)},{y(v)}" for j, v in enumerate(nums))
        lines.append(Series(label=label, points=points, colour=i % PALETTE_SIZE, values=nums))
    ticks = [(round(PAD + j * step, 2), day[5:]) for j, day in enumerate(days)
             if j % max(len(days) // 7, 1) == 0]
    return LineChart(series=lines, ticks=ticks, width=WIDTH, height=HEIGHT, top=PAD,
                     baseline=baseline, max_value=top)
