"""`cipherhive ctl report`: one self-contained HTML file with per-round charts.

The report is meant to be mailed or archived and opened anywhere, including
on machines without network access, so it has no scripts, fonts, images or
links: the page shell and the SVG charts are :mod:`cipherhive.report`'s, shared
with a member's own report (`cipherhive node report`). Every string from the
server is escaped.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
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
from cipherhive.report.page import document, esc, figure, summary_list
from cipherhive.report.svg import Series, line_chart
from cipherhive.v1 import federation_pb2 as pb

RoundLike = pb.RoundInfo | Mapping[str, Any]

#: The report stays readable (and its size bounded) however long the federation ran:
#: charts show the newest CHART_ROUNDS rounds, the table the newest TABLE_ROUNDS.
CHART_ROUNDS = 200
TABLE_ROUNDS = 1000
StatusLike = pb.StatusReply | Mapping[str, Any] | None


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
    return summary_list(rows)


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
            f'<td class="state">{esc(s.state)}</td>'
            f'<td class="num">{s.participants}/{s.expected}</td>'
            f"<td>{esc(fmt_time(s.opened_unix))}</td>"
            f"<td>{esc(fmt_time(s.closed_unix))}</td>"
            f'<td class="num">{esc(fmt_seconds(s.duration_seconds))}</td>'
            f'<td class="num">{esc(fmt_metric(s.mean_accuracy))}</td>'
            f'<td class="num">{esc(fmt_metric(s.mean_loss))}</td>'
            f'<td class="num">{esc(s.outcomes)}</td>'
            f"<td>{esc(s.reason or DASH)}</td>"
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
        f'<p class="muted">The {esc(what)} the newest {shown} of the {total} rounds in this report; '
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
        figure(
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
        figure(
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
        figure(
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
        figure(
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
    return document(
        title,
        [
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
        ],
    )
