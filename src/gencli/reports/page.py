"""One self-contained HTML page: inline CSS, images as ``data:`` URIs, every text escaped, no script.

Everything written into the page goes through :func:`text` (``html.escape``) — config values, metric names,
file names and failure reasons all come from files that may come from a stranger — except the markup this
module makes itself. The page's Content-Security-Policy allows inline styles and ``data:`` images and nothing
else (no scripts, no network), so even a value that slipped past escaping could not run or phone home.
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Iterable
from typing import Any

from gencli.reports.read import Picture

CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"

STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 1.5em auto; max-width: 1200px; padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; } h2 { border-bottom: 1px solid #ccc; margin-top: 2em; } h3 { margin-bottom: .3em; }
table { border-collapse: collapse; margin: .5em 0 1em; } td, th { border: 1px solid #ddd; padding: 2px 8px; }
th { background: #f3f3f3; text-align: left; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.best td { background: #eaf7ea; } tr.worst td { background: #fbeaea; } tr.failed td { color: #a00; }
pre { background: #f7f7f7; padding: .6em; overflow-x: auto; font-size: 12px; max-height: 40em; }
.notes { background: #fff6dd; border: 1px solid #e6cf7a; padding: .4em 1em; }
.figures { display: flex; flex-wrap: wrap; gap: 12px; align-items: flex-start; }
figure { margin: 0; } figcaption { font-size: 12px; color: #555; max-width: 420px; }
img.grid { image-rendering: pixelated; border: 1px solid #ddd; max-width: 380px; height: auto; }
details { margin: .3em 0; } summary { cursor: pointer; }
"""


def text(value: Any) -> str:
    """Any value as escaped HTML text."""
    return html.escape(str(value), quote=True)


def fmt(value: Any) -> str:
    """A number as a table shows it (6 significant digits), anything else as text; escaped."""
    if isinstance(value, bool) or value is None:
        return text("-" if value is None else value)
    if isinstance(value, int):
        return text(value)
    if isinstance(value, float):
        return text(f"{value:.6g}" if math.isfinite(value) else value)
    return text(value)


def table(headers: Iterable[Any], rows: Iterable[Iterable[Any]], row_classes: Iterable[str] | None = None) -> str:
    """A table of escaped cells; numbers right-aligned."""
    head = "".join(f"<th>{text(h)}</th>" for h in headers)
    classes = list(row_classes) if row_classes is not None else None
    body = []
    for i, row in enumerate(rows):
        cells = "".join(f'<td class="num">{fmt(c)}</td>' if isinstance(c, int | float) and not isinstance(c, bool)
                        else f"<td>{fmt(c)}</td>" for c in row)
        css = f' class="{text(classes[i])}"' if classes and classes[i] else ""
        body.append(f"<tr{css}>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def image(picture: Picture | bytes, caption: str, css: str = "") -> str:
    """A figure with the PNG embedded as a ``data:`` URI and an escaped caption."""
    png = picture.png if isinstance(picture, Picture) else picture
    src = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
    width = f' width="{picture.width}"' if isinstance(picture, Picture) else ""
    klass = f' class="{css}"' if css else ""
    return (f'<figure><img src="{src}" alt="{text(caption)}"{width}{klass}>'
            f"<figcaption>{text(caption)}</figcaption></figure>")


def figures(items: Iterable[str]) -> str:
    return f'<div class="figures">{"".join(items)}</div>'


def pre(content: str) -> str:
    return f"<pre>{text(content)}</pre>"


def details(summary: str, body: str) -> str:
    return f"<details><summary>{text(summary)}</summary>{body}</details>"


def paragraph(content: str) -> str:
    return f"<p>{text(content)}</p>"


def notes_box(notes: list[str]) -> str:
    if not notes:
        return ""
    items = "".join(f"<li>{text(note)}</li>" for note in notes)
    return (f'<div class="notes"><p><b>Not everything could be read</b> ({len(notes)} note(s)); the rest of the '
            f"report stands without it:</p><ul>{items}</ul></div>")


class Page:
    """Sections in order; :meth:`html` puts them in one document."""

    def __init__(self, title: str):
        self.title = title
        self.parts: list[str] = []

    def section(self, heading: str, *body: str, anchor: str = "") -> None:
        ident = f' id="{text(anchor)}"' if anchor else ""
        self.parts.append(f"<section{ident}><h2>{text(heading)}</h2>{''.join(body)}</section>")

    def add(self, markup: str) -> None:
        self.parts.append(markup)

    def html(self) -> str:
        return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
                f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
                '<meta name="viewport" content="width=device-width, initial-scale=1">'
                f"<title>{text(self.title)}</title><style>{STYLE}</style></head><body>"
                f"<h1>{text(self.title)}</h1>{''.join(self.parts)}</body></html>\n")


def flatten(tree: Any, prefix: str = "", limit: int = 400) -> list[tuple[str, Any]]:
    """Nested provenance as (dotted key, value) rows; long lists are shortened, the row count is bounded."""
    rows: list[tuple[str, Any]] = []

    def walk(node: Any, key: str) -> None:
        if len(rows) >= limit:
            return
        if isinstance(node, dict) and node:
            for child_key, child in node.items():
                walk(child, f"{key}.{child_key}" if key else str(child_key))
        elif isinstance(node, list) and node and all(not isinstance(x, dict | list) for x in node):
            shown = ", ".join(str(x) for x in node[:20])
            rows.append((key, f"[{shown}{', ...' if len(node) > 20 else ''}] ({len(node)})" if len(node) > 20
                         else f"[{shown}]"))
        elif isinstance(node, list) and node:
            for i, child in enumerate(node[:20]):
                walk(child, f"{key}[{i}]")
        else:
            rows.append((key, node))

    walk(tree, prefix)
    if len(rows) >= limit:
        rows.append(("...", f"(only the first {limit} entries are shown)"))
    return rows
