"""`cipherhive node report`: a member's own report, one self-contained HTML file.

The operator's report (`cipherhive ctl report`) shows the server's view, which holds no model
value. This one shows what only the member holds (:mod:`cipherhive.node.report_figures`): the
federated evaluation its node decrypted each round, the ε its privacy ledger has spent, and what
it did with every sum. It is written on the member's machine and sent nowhere; the page shell
and charts are :mod:`cipherhive.report`'s, so it opens offline and fetches nothing.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from itertools import pairwise

from cipherhive.node.privacy.ledger import LedgerEntry
from cipherhive.node.report_figures import NodeFigures, PrivacyFigures
from cipherhive.node.state.round_history import APPLIED, REJECTED, ROLLED_BACK, WITHDRAWN, RoundRecord
from cipherhive.report.page import document, esc, figure, summary_list
from cipherhive.report.svg import Mark, Series, line_chart, timeline

__all__ = ["CHART_ROUNDS", "render_node_report"]

#: Charts show the newest CHART_ROUNDS rounds (the table all the history keeps).
CHART_ROUNDS = 200
DASH = "—"


def fmt4(value: float | None) -> str:
    """A decrypted figure as the node logs it: 4 significant digits."""
    return DASH if value is None else f"{value:.4g}"


def fmt_epsilon(value: float | None) -> str:
    """ε as `cipherhive node privacy` prints it."""
    return DASH if value is None else f"{value:.4f}"


def fmt_time(unix: float) -> str:
    return DASH if unix <= 0 else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(unix))


def _undone(record: RoundRecord) -> bool:
    return record.outcome in (ROLLED_BACK, WITHDRAWN)


def _mark(record: RoundRecord) -> Mark:
    if record.outcome == REJECTED:
        return Mark(record.round, "failed", f"rejected: {record.reason}")
    if _undone(record):
        return Mark(record.round, "undone", f"{record.outcome}: {record.reason}")
    if not record.uploaded:
        return Mark(record.round, "idle", "applied; this node sent no update (sat the round out)")
    return Mark(record.round, "", "applied, with this node's update")


def _summary(f: NodeFigures, now: float) -> str:
    count = {o: sum(r.outcome == o for r in f.rounds) for o in (APPLIED, REJECTED, ROLLED_BACK, WITHDRAWN)}
    sat_out = sum(r.outcome == APPLIED and not r.uploaded for r in f.rounds)
    rows = [
        ("generated", fmt_time(now)),
        ("node", f.name),
        ("state directory", str(f.state_dir)),
        ("current global model", f"round {f.current_round}" if f.current_round else "the initial model"),
        ("rounds in this report", f"{f.rounds[0].round} to {f.rounds[-1].round} ({len(f.rounds)})"),
        ("applied", str(count[APPLIED])),
        ("applied without this node's update", str(sat_out)),
        ("rejected by this node's checks", str(count[REJECTED])),
        ("rolled back / withdrawn", f"{count[ROLLED_BACK]} / {count[WITHDRAWN]}"),
        ("differential privacy", _privacy_line(f.privacy)),
    ]
    return summary_list(rows)


def _privacy_line(p: PrivacyFigures) -> str:
    if not p.enabled:
        return "no differential privacy"
    if p.problem:
        return "the privacy ledger cannot be read (see below)"
    return (
        f"ε = {fmt_epsilon(p.spent)} of {p.limit:g} at δ = {p.delta:g} "
        f"(dataset {p.dataset!r}, {len(p.entries)} rounds charged)"
    )


def _evaluation(f: NodeFigures, charted: Sequence[RoundRecord]) -> list[str]:
    numbers = [r.round for r in charted]
    undone = [_undone(r) for r in charted]
    out = [
        "<p class=\"muted\">The federation-wide mean of every member's evaluation of a round's base model "
        "(the global model the round trained from), as this node decrypted it from the round's sum, "
        "rounded to 4 significant digits. Shown at the round whose sum carried it.</p>"
    ]
    if not any(r.evaluation for r in f.rounds):
        why = (
            "under differential privacy nodes send no evaluation (validation data is outside the "
            "privacy accounting)"
            if f.privacy.enabled
            else "the members' trainers have no evaluate(), or no round carried one yet"
        )
        out.append(f'<p class="muted">No federated evaluation recorded: {esc(why)}.</p>')
    legend = [("", "value"), ("failed", "round later rolled back or withdrawn")]
    charts = []
    for metric, fixed in (("accuracy", (0.0, 1.0)), ("loss", None)):
        title = f"Federated {metric} of each round's base model"
        charts.append(
            figure(
                title,
                line_chart(
                    title,
                    numbers,
                    [Series(metric, [r.evaluation.get(metric) for r in charted])],
                    y_label=metric,
                    fmt=fmt4,
                    failed=undone,
                    fixed_range=fixed,
                ),
                legend,
            )
        )
    return [*out, '<div class="charts">', *charts, "</div>"]


def _level(entry: LedgerEntry) -> str:
    """Member-level rounds are charged as one step at sample rate 1 (cipherhive.privacy.schedule)."""
    e = entry.event
    return "member-level" if (e.sample_rate, e.steps) == (1.0, 1) else "record-level"


def _privacy(p: PrivacyFigures) -> list[str]:
    if not p.enabled:
        return [
            '<p class="privacy-off">This node trains with no differential privacy ([privacy] max_epsilon '
            "is not set): no ε to show.</p>"
        ]
    out = [
        f'<p class="muted">From the privacy ledger {esc(p.path)} of dataset {esc(p.dataset)}: every round '
        "any node trained on this dataset with differential privacy, in any federation. ε (Rényi DP "
        f"accountant) at δ = {esc(f'{p.delta:g}')}, the limit this node enforces being {esc(f'{p.limit:g}')}."
        "</p>"
    ]
    if p.problem:
        return [*out, f"<p><strong>The ledger cannot be read:</strong> {esc(p.problem)}</p>"]
    entries = list(enumerate(p.entries))
    numbers = [e.round for _, e in entries]
    increasing = all(a < b for a, b in pairwise(numbers))
    x_label = "round" if increasing else "charge (ledger order)"
    xs = numbers if increasing else [i + 1 for i, _ in entries]
    points = sorted(p.epsilon_after)
    title = "ε spent on this dataset"
    out.append('<div class="charts">')
    out.append(
        figure(
            title,
            line_chart(
                title,
                [xs[i] for i in points],
                [
                    Series("ε", [p.epsilon_after[i] for i in points]),
                    Series("limit", [p.limit for _ in points], secondary=True),
                ],
                y_label="ε",
                fmt=fmt_epsilon,
                x_label=x_label,
            ),
            [("", "ε after the round"), ("secondary", "this node's limit")],
        )
    )
    out.append("</div>")
    if len(points) < len(entries):
        out.append(
            f'<p class="muted">ε is computed for {len(points)} of the {len(entries)} charges, spread evenly, '
            "the newest included; `cipherhive node privacy` prints the total.</p>"
        )
    head = (
        '<tr><th class="num">round</th><th>level</th><th class="num">noise multiplier</th>'
        '<th class="num">sample rate</th><th class="num">steps</th><th class="num">ε after</th></tr>'
    )
    rows = [
        "<tr>"
        f'<td class="num">{e.round}</td><td>{_level(e)}</td>'
        f'<td class="num">{e.event.noise_multiplier:g}</td><td class="num">{e.event.sample_rate:g}</td>'
        f'<td class="num">{e.event.steps}</td><td class="num">{fmt_epsilon(p.epsilon_after.get(i))}</td>'
        "</tr>"
        for i, e in reversed(entries)
    ] or ['<tr><td colspan="6" class="muted">no round charged yet</td></tr>']
    out.append(f"<table>\n<thead>{head}</thead>\n<tbody>\n" + "\n".join(rows) + "\n</tbody>\n</table>")
    return out


def _rounds(f: NodeFigures, charted: Sequence[RoundRecord]) -> list[str]:
    title = "What this node did with each round's sum"
    out = [
        '<div class="charts">',
        figure(
            title,
            timeline(title, [_mark(r) for r in charted]),
            [
                ("mark", "applied"),
                ("mark idle", "applied, no update from this node"),
                ("mark failed", "rejected"),
                ("mark undone", "rolled back or withdrawn"),
            ],
        ),
        "</div>",
        '<p class="muted">Rounds that failed before a sum was published, and rounds this node neither '
        "applied nor rejected, are not listed: the operator's report (`cipherhive ctl report`) has "
        "every round.</p>",
    ]
    head = (
        '<tr><th class="num">round</th><th class="state">outcome</th><th class="num">participants</th>'
        '<th>own update</th><th class="num">model of round</th><th class="num">examples</th>'
        '<th class="num">accuracy</th><th class="num">loss</th><th>recorded</th><th>reason</th></tr>'
    )
    rows = []
    for r in reversed(f.rounds):
        ev = r.evaluation
        cls = {REJECTED: "rejected", ROLLED_BACK: "undone", WITHDRAWN: "undone"}.get(r.outcome, "")
        of_round = ev.get("of_round")
        examples = ev.get("examples")
        row = f'<tr class="{cls}">' if cls else "<tr>"
        rows.append(
            f'{row}<td class="num">{r.round}</td><td class="state">{esc(r.outcome)}</td>'
            f'<td class="num">{r.participants or DASH}</td><td>{"sent" if r.uploaded else DASH}</td>'
            f'<td class="num">{DASH if of_round is None else int(of_round)}</td>'
            f'<td class="num">{DASH if examples is None else int(examples)}</td>'
            f'<td class="num">{fmt4(ev.get("accuracy"))}</td><td class="num">{fmt4(ev.get("loss"))}</td>'
            f"<td>{esc(fmt_time(r.at))}</td><td>{esc(r.reason or DASH)}</td></tr>"
        )
    return [*out, f"<table>\n<thead>{head}</thead>\n<tbody>\n" + "\n".join(rows) + "\n</tbody>\n</table>"]


def render_node_report(f: NodeFigures, *, now: float | None = None) -> str:
    """The whole HTML document for a member's figures."""
    now = time.time() if now is None else now
    charted = f.rounds[-CHART_ROUNDS:]
    body = [
        '<p class="muted">Drawn from this node\'s own state directory and privacy ledger on this machine. '
        "None of these figures is sent to the server, and the file fetches nothing when opened.</p>",
        _summary(f, now),
    ]
    if f.history_problem:
        body.append(f"<p><strong>The round history cannot be read:</strong> {esc(f.history_problem)}</p>")
    if len(charted) < len(f.rounds):
        shown = f"The charts show the newest {len(charted)} of {len(f.rounds)} rounds."
        body.append(f'<p class="muted">{shown}</p>')
    body += ["<h2>Federated evaluation</h2>", *_evaluation(f, charted)]
    body += ["<h2>Differential privacy</h2>", *_privacy(f.privacy)]
    body += ["<h2>Rounds</h2>", *_rounds(f, charted)]
    return document(f"cipherhive member report: {f.name}", body)
