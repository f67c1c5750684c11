"""The page shell of a self-contained report: CSS, escaping, figures, a summary list, the document.

A report is meant to be mailed or archived and opened anywhere, including on machines without
network access, so it has no scripts, fonts, images or links: inline CSS only, and a
Content-Security-Policy that forbids every fetch, so a browser would refuse even a stray
reference. Every string a caller passes in goes through :func:`esc`.
"""

from __future__ import annotations

import html
from collections.abc import Sequence

__all__ = ["CSS", "document", "esc", "figure", "summary_list"]

CSS = """
:root { color-scheme: light dark; --fg: #1d2330; --muted: #667085; --grid: #e4e7ec; --bg: #ffffff;
  --card: #f8f9fb; --line: #2563eb; --line2: #98a2b3; --bad: #d92d20; --warn: #dc6803; }
@media (prefers-color-scheme: dark) { :root { --fg: #e6e8ee; --muted: #98a2b3; --grid: #344054;
  --bg: #111318; --card: #1a1d24; --line: #60a5fa; --line2: #667085; --bad: #f97066; --warn: #fdb022; } }
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
svg circle, svg rect.mark { fill: var(--line); }
svg circle.secondary { fill: var(--line2); }
svg circle.failed, svg rect.mark.failed { fill: var(--bad); }
svg rect.mark.undone { fill: var(--warn); }
svg rect.mark.idle { fill: var(--line2); }
svg .empty { font-size: 13px; }
.legend { font-size: 12px; color: var(--muted); margin-top: .25rem; }
.legend span { margin-right: 1rem; }
.swatch { display: inline-block; width: 18px; height: 3px; vertical-align: middle; margin-right: .3rem;
  background: var(--line); }
.swatch.secondary { background: var(--line2); }
.swatch.failed { width: 8px; height: 8px; border-radius: 50%; background: var(--bad); }
.swatch.mark { width: 10px; height: 10px; }
.swatch.mark.failed { border-radius: 0; }
.swatch.mark.undone { background: var(--warn); }
.swatch.mark.idle { background: var(--line2); }
table { border-collapse: collapse; width: 100%; font-variant-numeric: tabular-nums; }
th, td { padding: .35rem .6rem; border-bottom: 1px solid var(--grid); text-align: left; }
th { color: var(--muted); font-weight: 600; }
td.num, th.num { text-align: right; }
tr.failed td.state, tr.withdrawn td.state, tr.rejected td.state { color: var(--bad); font-weight: 600; }
tr.undone td.state { color: var(--warn); font-weight: 600; }
"""


def esc(value: object) -> str:
    """``value`` as HTML text or attribute value: nothing a caller passes in is markup."""
    return html.escape(str(value), quote=True)


def figure(caption: str, svg: str, legend: Sequence[tuple[str, str]] = ()) -> str:
    """A chart in its card, with a caption and a legend of (swatch class, text) pairs."""
    items = "".join(f'<span><i class="swatch {esc(cls)}"></i>{esc(text)}</span>' for cls, text in legend)
    legend_html = f'<div class="legend">{items}</div>' if legend else ""
    return f"<figure><figcaption>{esc(caption)}</figcaption>\n{svg}\n{legend_html}</figure>"


def summary_list(rows: Sequence[tuple[str, str]]) -> str:
    """The report's key figures: a definition list of (label, value)."""
    body = "".join(f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in rows)
    return f'<dl class="summary">{body}</dl>'


def document(title: str, body: Sequence[str]) -> str:
    """The whole HTML document: ``body`` is already-escaped markup, in order."""
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
            f"<title>{esc(title)}</title>",
            f"<style>{CSS}</style>",
            "</head>",
            "<body>",
            f"<h1>{esc(title)}</h1>",
            *body,
            "</body>",
            "</html>",
            "",
        ]
    )
