"""Inline SVG charts drawn in Python: values per round, and a timeline of what happened per round.

Drawn here rather than by a charting library so that a report needs nothing at all when it is
opened (see :mod:`cipherhive.report.page`). Colours come from the page's CSS classes; every label
and tooltip goes through :func:`~cipherhive.report.page.esc`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from cipherhive.report.page import esc

__all__ = ["Mark", "Series", "line_chart", "timeline"]

W, H = 560, 250
LEFT, RIGHT, TOP, BOTTOM = 60, 18, 16, 42
#: Height of a timeline (one row of marks, no y axis).
TIMELINE_H = 110


@dataclass(frozen=True)
class Series:
    """One line of a chart; ``None`` values leave a gap instead of inventing a point."""

    label: str
    values: Sequence[float | None]
    secondary: bool = False


@dataclass(frozen=True)
class Mark:
    """One round on a timeline: its CSS class (``""``, ``failed``, ``undone``, ``idle``) and tooltip."""

    round: int
    css: str
    note: str


def _num(value: float) -> str:
    """SVG coordinates: short, locale-free."""
    return f"{value:.1f}"


def _nice_step(span: float, target_ticks: int = 5) -> float:
    """A round step (1, 2, 2.5 or 5 times a power of ten): about ``target_ticks`` intervals."""
    if span <= 0 or not math.isfinite(span):
        return 1.0
    raw = span / target_ticks
    magnitude: float = 10.0 ** math.floor(math.log10(raw))
    for multiple in (1, 2, 2.5, 5, 10):
        if raw <= multiple * magnitude:
            return multiple * magnitude
    return 10 * magnitude


def _y_range(
    values: Sequence[float], fixed: tuple[float, float] | None, integer: bool = False
) -> tuple[float, float, float]:
    """(low, high, step) for the y axis; zero-based unless data goes negative."""
    if fixed is not None and all(fixed[0] <= v <= fixed[1] for v in values):
        low, high = fixed
        return low, high, _nice_step(high - low)
    low = min(0.0, *values)
    high = max(values)
    if high <= low:
        high = low + 1.0
    step = _nice_step(high - low)
    if integer:
        step = max(1.0, math.ceil(step))  # no "2.5 nodes" tick
    return math.floor(low / step + 1e-9) * step, math.ceil(high / step - 1e-9) * step, step


def _decimals(step: float) -> int:
    """Fewest decimals that show every multiple of ``step`` exactly (0.25 → 2, 5 → 0)."""
    for digits in range(7):
        if abs(round(step, digits) - step) <= step * 1e-9:
            return digits
    return 6


def _open(title: str, height: int) -> list[str]:
    return [
        f'<svg viewBox="0 0 {W} {height}" width="{W}" height="{height}" role="img" '
        f'aria-label="{esc(title)}">',
        f"<title>{esc(title)}</title>",
    ]


def _empty(out: list[str], height: int) -> str:
    out.append(
        f'<text class="empty" x="{W / 2:.0f}" y="{height / 2:.0f}" text-anchor="middle">'
        "no data for this chart yet</text></svg>"
    )
    return "\n".join(out)


class _XAxis:
    """Round numbers from ``first`` to ``last`` along the plot's width, with at most ~12 labels."""

    inset = 12  # keep the first and last points off the y axis

    def __init__(self, first: int, last: int) -> None:
        self.first, self.last = first, last
        self.width = W - LEFT - RIGHT

    def x_of(self, number: int) -> float:
        if self.last == self.first:
            return LEFT + self.width / 2
        span = self.last - self.first
        return LEFT + self.inset + (number - self.first) / span * (self.width - 2 * self.inset)

    def draw(self, out: list[str], base_y: float, height: int, label: str) -> None:
        out.append(f'<line class="axis" x1="{LEFT}" x2="{W - RIGHT}" y1="{base_y}" y2="{base_y}"/>')
        every = max(1, math.ceil((self.last - self.first + 1) / 12))
        for number in range(self.first, self.last + 1):
            if (number - self.first) % every and number != self.last:
                continue
            x = self.x_of(number)
            out.append(f'<line class="axis" x1="{_num(x)}" x2="{_num(x)}" y1="{base_y}" y2="{base_y + 4}"/>')
            out.append(f'<text x="{_num(x)}" y="{base_y + 17}" text-anchor="middle">{number}</text>')
        out.append(
            f'<text x="{LEFT + self.width / 2:.0f}" y="{height - 4}" text-anchor="middle">{esc(label)}</text>'
        )


def line_chart(
    title: str,
    rounds: Sequence[int],
    series: Sequence[Series],
    *,
    y_label: str,
    fmt: Callable[[float], str],
    failed: Sequence[bool] = (),
    fixed_range: tuple[float, float] | None = None,
    integer: bool = False,
    x_label: str = "round",
) -> str:
    """An inline SVG line chart of values per round number (x axis: rounds)."""
    plot_h = H - TOP - BOTTOM
    present = [v for s in series for v in s.values if v is not None and math.isfinite(v)]
    out = _open(title, H)
    if not rounds or not present:
        return _empty(out, H)

    axis = _XAxis(min(rounds), max(rounds))
    x_of = axis.x_of
    low, high, step = _y_range(present, fixed_range, integer)

    def y_of(value: float) -> float:
        return TOP + plot_h - (value - low) / (high - low) * plot_h

    # Horizontal grid lines with y tick labels.
    decimals = _decimals(step)
    for i in range(round((high - low) / step) + 1):
        tick = low + i * step
        y = y_of(tick)
        out.append(f'<line class="grid" x1="{LEFT}" x2="{W - RIGHT}" y1="{_num(y)}" y2="{_num(y)}"/>')
        out.append(f'<text x="{LEFT - 6}" y="{_num(y + 4)}" text-anchor="end">{tick:.{decimals}f}</text>')
    axis.draw(out, TOP + plot_h, H, x_label)
    out.append(
        f'<text x="14" y="{TOP + plot_h / 2:.0f}" text-anchor="middle" '
        f'transform="rotate(-90 14 {TOP + plot_h / 2:.0f})">{esc(y_label)}</text>'
    )

    # Secondary (reference) lines first, so the main series is drawn on top of them.
    for s in sorted(series, key=lambda item: not item.secondary):
        css = "series secondary" if s.secondary else "series"
        # One polyline per run of consecutive known values: a gap stays a gap.
        run: list[str] = []
        runs: list[list[str]] = [run]
        for number, value in zip(rounds, s.values, strict=True):
            if value is None or not math.isfinite(value):
                run = []
                runs.append(run)
                continue
            run.append(f"{_num(x_of(number))},{_num(y_of(value))}")
        for points in runs:
            if len(points) > 1:
                out.append(f'<polyline class="{css}" points="{" ".join(points)}"/>')
        for i, (number, value) in enumerate(zip(rounds, s.values, strict=True)):
            if value is None or not math.isfinite(value):
                continue
            is_failed = i < len(failed) and failed[i]
            cls = "failed" if is_failed and not s.secondary else ("secondary" if s.secondary else "")
            note = " (failed)" if is_failed else ""
            out.append(
                f'<circle class="{cls}" cx="{_num(x_of(number))}" cy="{_num(y_of(value))}" '
                f'r="{2.5 if s.secondary else 3.5}"><title>{esc(s.label)}, {esc(x_label)} {number}: '
                f"{esc(fmt(value))}{esc(note)}</title></circle>"
            )
    out.append("</svg>")
    return "\n".join(out)


def timeline(title: str, marks: Sequence[Mark], *, x_label: str = "round") -> str:
    """An inline SVG row of one mark per round, coloured by its CSS class, with a tooltip each:
    which rounds were applied, rejected or undone, at a glance."""
    out = _open(title, TIMELINE_H)
    if not marks:
        return _empty(out, TIMELINE_H)
    numbers = [m.round for m in marks]
    axis = _XAxis(min(numbers), max(numbers))
    base_y = TIMELINE_H - BOTTOM
    span = max(numbers) - min(numbers) + 1
    width = max(2.0, min(14.0, (axis.width - 2 * axis.inset) / span - 1))
    out.append(f'<line class="grid" x1="{LEFT}" x2="{W - RIGHT}" y1="{TOP + 20}" y2="{TOP + 20}"/>')
    for mark in marks:
        x = axis.x_of(mark.round) - width / 2
        css = f"mark {mark.css}".strip()
        out.append(
            f'<rect class="{esc(css)}" x="{_num(x)}" y="{TOP + 6}" width="{_num(width)}" height="28">'
            f"<title>{esc(x_label)} {mark.round}: {esc(mark.note)}</title></rect>"
        )
    axis.draw(out, base_y, TIMELINE_H, x_label)
    out.append("</svg>")
    return "\n".join(out)
