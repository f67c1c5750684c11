"""`cipherhive ctl report`: one self-contained HTML file with per-round charts.

The report is meant to be mailed or archived and opened anywhere, including
on machines without network access, so it has no scripts, fonts, images or
links: inline CSS, and SVG charts drawn here in Python. A Content-Security-
Policy forbids every fetch, so a browser would refuse even a stray reference.
Every string from the server goes through ``html.escape``.
"""

from __future__ import annotations

import html
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from google.protobuf import json_format

from cipherhive.ctl.render import (
    DASH,
    RoundSummary,
    as_round_info,
    fmt_metric,
    fmt_seconds,
    fmt_time,
)
from cipherhive.v1 import federation_pb2 as pb

RoundLike = pb.RoundInfo | Mapping[str, Any]

#: The report stays readable (and its size bounded) however long the federation ran:
#: charts show the newest CHART_ROUNDS rounds, the table the newest TABLE_ROUNDS.
CHART_ROUNDS = 200
TABLE_ROUNDS = 1000
StatusLike = pb.StatusReply | Mapping[str, Any] | None

_W, _H = 560, 250
_LEFT, _RIGHT, _TOP, _BOTTOM = 60, 18, 16, 42

_CSS = """
:root { color-scheme: light dark; --fg: #1d2330; --muted: #667085; --grid: #e4e7ec; --bg: #ffffff;
  --card: #f8f9fb; --line: #2563eb; --line2: #98a2b3; --bad: #d92d20; }
@media (prefers-color-scheme: dark) { :root { --fg: #e6e8ee; --muted: #98a2b3; --grid: #344054;
  --bg: #111318; --card: #1a1d24; --line: #60a5fa; --line2: #667085; --bad: #f97066; } }
* { box-sizing: border-box; }
body { margin: 2rem auto; max-width: 1200px; padding: 0 1rem; background: var(--bg); color: var(--fg);
  font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; }
h1 { font-size: 1.5rem; margin: 0 0 .25rem; }
h2 { font-size: 1.1rem; margin: 2rem 0 .75rem; }
.muted { color: var(--muted); }
dl.summary { display: grid; grid-template-columns: max-content 1fr; gap: .2rem 1.5rem; margin: 1rem 0; }
dl.summary dt { color: var(--muted); }
dl.summary dd { margin: 0; font-variant-numeric: tabular-nums; }
.charts { display: grid; grid-template-columns: repeat(auto-fit, minmax(480px, 1fr)); gap: 1rem; }
figure { margin: 0; padding: .75rem; background: var(--card); border-radius: 8px; }
figcaption { font-weight: 600; margin-bottom: .25rem; }
svg { width: 100%; height: auto; display: block; }
svg text { fill: var(--muted); font-size: 11px; font-family: inherit; }
svg .grid { stroke: var(--grid); stroke-width: 1; }
svg .axis { stroke: var(--muted); stroke-width: 1; }
svg .series { fill: none; stroke: var(--line); stroke-width: 2; }
svg .series.secondary { stroke: var(--line2); stroke-dasharray: 5 4; stroke-width: 1.5; }
svg circle { fill: var(--line); }
svg circle.secondary { fill: var(--line2); }
svg circle.failed { fill: var(--bad); }
svg .empty { font-size: 13px; }
.legend { font-size: 12px; color: var(--muted); margin-top: .25rem; }
.legend span { margin-right: 1rem; }
.swatch { display: inline-block; width: 18px; height: 3px; vertical-align: middle; margin-right: .3rem;
  background: var(--line); }
.swatch.secondary { background: var(--line2); }
.swatch.failed { width: 8px; height: 8px; border-radius: 50%; background: var(--bad); }
table { border-collapse: collapse; width: 100%; font-variant-numeric: tabular-nums; }
th, td { padding: .35rem .6rem; border-bottom: 1px solid var(--grid); text-align: left; }
th { color: var(--muted); font-weight: 600; }
td.num, th.num { text-align: right; }
tr.failed td.state, tr.withdrawn td.state { color: var(--bad); font-weight: 600; }
"""


@dataclass(frozen=True)
class Series:
    """One line of a chart; ``None`` values leave a gap instead of inventing a point."""

    label: str
    values: Sequence[float | None]
    secondary: bool = False


def _esc(value: object) -> str:
    return html.escape(str(value), quote=True)


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
) -> str:
    """An inline SVG line chart of values per round number (x axis: rounds)."""
    plot_w = _W - _LEFT - _RIGHT
    plot_h = _H - _TOP - _BOTTOM
    present = [v for s in series for v in s.values if v is not None and math.isfinite(v)]
    out = [
        f'<svg viewBox="0 0 {_W} {_H}" width="{_W}" height="{_H}" role="img" aria-label="{_esc(title)}">',
        f"<title>{_esc(title)}</title>",
    ]
    if not rounds or not present:
        out.append(
            f'<text class="empty" x="{_W / 2:.0f}" y="{_H / 2:.0f}" text-anchor="middle">'
            "no data for this chart yet</text></svg>"
        )
        return "\n".join(out)

    first, last = min(rounds), max(rounds)
    low, high, step = _y_range(present, fixed_range, integer)

    inset = 12  # keep the first and last points off the y axis

    def x_of(number: int) -> float:
        if last == first:
            return _LEFT + plot_w / 2
        return _LEFT + inset + (number - first) / (last - first) * (plot_w - 2 * inset)

    def y_of(value: float) -> float:
        return _TOP + plot_h - (value - low) / (high - low) * plot_h

    # Horizontal grid lines with y tick labels.
    decimals = _decimals(step)
    for i in range(round((high - low) / step) + 1):
        tick = low + i * step
        y = y_of(tick)
        out.append(f'<line class="grid" x1="{_LEFT}" x2="{_W - _RIGHT}" y1="{_num(y)}" y2="{_num(y)}"/>')
        out.append(f'<text x="{_LEFT - 6}" y="{_num(y + 4)}" text-anchor="end">{tick:.{decimals}f}</text>')
    # X axis with at most ~12 round labels.
    base_y = _TOP + plot_h
    out.append(f'<line class="axis" x1="{_LEFT}" x2="{_W - _RIGHT}" y1="{base_y}" y2="{base_y}"/>')
    every = max(1, math.ceil((last - first + 1) / 12))
    for number in range(first, last + 1):
        if (number - first) % every and number != last:
            continue
        x = x_of(number)
        out.append(f'<line class="axis" x1="{_num(x)}" x2="{_num(x)}" y1="{base_y}" y2="{base_y + 4}"/>')
        out.append(f'<text x="{_num(x)}" y="{base_y + 17}" text-anchor="middle">{number}</text>')
    out.append(f'<text x="{_LEFT + plot_w / 2:.0f}" y="{_H - 4}" text-anchor="middle">round</text>')
    out.append(
        f'<text x="14" y="{_TOP + plot_h / 2:.0f}" text-anchor="middle" '
        f'transform="rotate(-90 14 {_TOP + plot_h / 2:.0f})">{_esc(y_label)}</text>'
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
                f'r="{2.5 if s.secondary else 3.5}"><title>{_esc(s.label)}, round {number}: '
                f"{_esc(fmt(value))}{_esc(note)}</title></circle>"
            )
    out.append("</svg>")
    return "\n".join(out)


def _figure(caption: str, svg: str, legend: Sequence[tuple[str, str]] = ()) -> str:
    items = "".join(f'<span><i class="swatch {_esc(cls)}"></i>{_esc(text)}</span>' for cls, text in legend)
    legend_html = f'<div class="legend">{items}</div>' if legend else ""
    return f"<figure><figcaption>{_esc(caption)}</figcaption>\n{svg}\n{legend_html}</figure>"


def _as_status(status: StatusLike) -> pb.StatusReply | None:
    if status is None or isinstance(status, pb.StatusReply):
        return status
    return json_format.ParseDict(dict(status), pb.StatusReply(), ignore_unknown_fields=True)


def _summary_html(status: pb.StatusReply | None, summaries: Sequence[RoundSummary], now: float) -> str:
    rows: list[tuple[str, str]] = [("generated", fmt_time(now))]
    if status is not None:
        s = status.settings
        rows += [
            ("server version", status.version or DASH),
            ("server started", fmt_time(status.started_unix)),
            ("nodes online / known", f"{status.nodes_online} / {status.nodes_known}"),
            ("latest round", str(status.latest_round or DASH)),
            ("latest published sum", str(status.latest_sum_round or DASH)),
            ("failed rounds", str(status.rounds_failed)),
            ("min participants", str(s.min_participants)),
            ("round timeout", fmt_seconds(s.round_timeout_seconds)),
            ("key fingerprint", s.key_fingerprint[:16] + "…" if s.key_fingerprint else DASH),
        ]
    if summaries:
        rows.append(
            ("rounds in this report", f"{summaries[0].round} to {summaries[-1].round} ({len(summaries)})")
        )
        withdrawn = sum(s.state == "withdrawn" for s in summaries)
        rows.append(("withdrawn rounds", str(withdrawn)))
    else:
        rows.append(("rounds in this report", "none"))
    body = "".join(f"<dt>{_esc(k)}</dt><dd>{_esc(v)}</dd>" for k, v in rows)
    return f'<dl class="summary">{body}</dl>'


def _table_html(summaries: Sequence[RoundSummary]) -> str:
    head = (
        '<tr><th class="num">round</th><th>state</th><th class="num">participants</th><th>opened</th>'
        '<th>closed</th><th class="num">duration</th><th class="num">mean accuracy</th>'
        '<th class="num">mean loss</th><th class="num">applied/rejected</th><th>reason</th></tr>'
    )
    rows = []
    for s in summaries:
        cls = f' class="{s.state}"' if s.state in ("failed", "withdrawn") else ""
        rows.append(
            f"<tr{cls}>"
            f'<td class="num">{s.round}</td>'
            f'<td class="state">{_esc(s.state)}</td>'
            f'<td class="num">{s.participants}/{s.expected}</td>'
            f"<td>{_esc(fmt_time(s.opened_unix))}</td>"
            f"<td>{_esc(fmt_time(s.closed_unix))}</td>"
            f'<td class="num">{_esc(fmt_seconds(s.duration_seconds))}</td>'
            f'<td class="num">{_esc(fmt_metric(s.mean_accuracy))}</td>'
            f'<td class="num">{_esc(fmt_metric(s.mean_loss))}</td>'
            f'<td class="num">{_esc(s.outcomes)}</td>'
            f"<td>{_esc(s.reason or DASH)}</td>"
            "</tr>"
        )
    if not rows:
        rows.append('<tr><td colspan="10" class="muted">no round yet</td></tr>')
    return f"<table>\n<thead>{head}</thead>\n<tbody>\n" + "\n".join(rows) + "\n</tbody>\n</table>"


def _bounded_note(shown: int, total: int, what: str) -> str:
    """Say so when part of the history is left out (the report must stay bounded)."""
    if shown >= total:
        return ""
    return (
        f'<p class="muted">The {_esc(what)} the newest {shown} of the {total} rounds in this report; '
        "`cipherhive ctl rounds --json` lists them all.</p>"
    )


def render_report(rounds: Sequence[RoundLike], status: StatusLike = None, *, now: float | None = None) -> str:
    """The whole HTML document for ``rounds`` (RoundInfo messages or their `--json` dicts)."""
    now = time.time() if now is None else now
    infos = sorted((as_round_info(r) for r in rounds), key=lambda info: info.round)
    summaries = [RoundSummary.of(info) for info in infos]
    st = _as_status(status)
    charted = summaries[-CHART_ROUNDS:]
    tabled = summaries[-TABLE_ROUNDS:]
    numbers = [s.round for s in charted]
    failed = [s.state in ("failed", "withdrawn") for s in charted]

    charts = [
        _figure(
            "Participants per round",
            line_chart(
                "Participants per round",
                numbers,
                [
                    Series("participants", [float(s.participants) for s in charted]),
                    Series("expected", [float(s.expected) for s in charted], secondary=True),
                ],
                y_label="nodes",
                fmt=lambda v: f"{v:.0f}",
                failed=failed,
                integer=True,
            ),
            [("", "participants"), ("secondary", "expected"), ("failed", "failed round")],
        ),
        _figure(
            "Mean accuracy reported by the nodes",
            line_chart(
                "Mean accuracy reported by the nodes",
                numbers,
                [Series("mean accuracy", [s.mean_accuracy for s in charted])],
                y_label="accuracy",
                fmt=fmt_metric,
                failed=failed,
                fixed_range=(0.0, 1.0),
            ),
        ),
        _figure(
            "Mean loss reported by the nodes",
            line_chart(
                "Mean loss reported by the nodes",
                numbers,
                [Series("mean loss", [s.mean_loss for s in charted])],
                y_label="loss",
                fmt=fmt_metric,
                failed=failed,
            ),
        ),
        _figure(
            "Round duration (closed - opened)",
            line_chart(
                "Round duration (closed - opened)",
                numbers,
                [Series("duration", [s.duration_seconds for s in charted])],
                y_label="seconds",
                fmt=fmt_seconds,
                failed=failed,
            ),
        ),
    ]
    title = "cipherhive federation report"
    return "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en">',
            "<head>",
            '<meta charset="utf-8">',
            # Nothing may be fetched: the file must render the same offline.
            '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; '
            "style-src 'unsafe-inline'\">",
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            f"<title>{_esc(title)}</title>",
            f"<style>{_CSS}</style>",
            "</head>",
            "<body>",
            f"<h1>{_esc(title)}</h1>",
            '<p class="muted">Values are the means of the loss and accuracy each node reported on its '
            "own data (rounded by the node); the server never sees model values.</p>",
            _summary_html(st, summaries, now),
            "<h2>Per-round curves</h2>",
            _bounded_note(len(charted), len(summaries), "charts show"),
            '<div class="charts">',
            *charts,
            "</div>",
            "<h2>Rounds</h2>",
            _bounded_note(len(tabled), len(summaries), "table shows"),
            _table_html(tabled),
            "</body>",
            "</html>",
            "",
        ]
    )
