"""Standalone HTML pages of the Markdown tables, for viewers that do not render Markdown."""
from __future__ import annotations

import base64
import html
import re

TABLES_CSS = """body { font-family: sans-serif; font-size: 14px; margin: 1em; color: #222; }
h3 { margin: 1.6em 0 0.4em; font-size: 1.1em; }
table { border-collapse: collapse; margin: 0.4em 0; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; white-space: nowrap; }
th { background: #f2f2f2; }
tbody tr:nth-child(even) { background: #fafafa; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
p { margin: 0.3em 0; max-width: 60em; }
.scroll { overflow-x: auto; max-width: 100%; }
img { max-width: 100%; height: auto; }"""


def _md_cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def html_tables(markdown: str, title: str = "poisongrid summary tables", images: dict[str, bytes] | None = None) -> str:
    """A standalone HTML page of markdown_tables' output (### headings, paragraphs, pipe tables and
    `![alt](path)` images; an image whose path is in `images` is embedded, so the page stands alone).
    Tables scroll sideways inside the page rather than overflowing it.

    For viewers that do not render Markdown, e.g. the Snakemake report, which shows an HTML file inline.
    """
    out = ["<!DOCTYPE html>", '<html lang="en">', '<head><meta charset="utf-8">',
           f"<title>{html.escape(title)}</title>", f"<style>\n{TABLES_CSS}\n</style>", "</head>", "<body>"]
    lines = markdown.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("### "):
            out.append(f"<h3>{html.escape(line[4:])}</h3>")
        elif line.startswith("|") and i + 1 < len(lines) and re.fullmatch(r"\|(?:\s*:?-+:?\s*\|)+", lines[i + 1].strip()):
            # Right-aligned (---:) columns hold numbers.
            cls = ["" if not c.endswith(":") else ' class="num"' for c in _md_cells(lines[i + 1])]

            def row(cells_line: str, tag: str) -> str:
                cells = _md_cells(cells_line)
                return "<tr>" + "".join(f"<{tag}{cls[j] if j < len(cls) else ''}>{html.escape(c)}</{tag}>"
                                        for j, c in enumerate(cells)) + "</tr>"

            out += ['<div class="scroll"><table>', "<thead>" + row(line, "th") + "</thead>", "<tbody>"]
            i += 2
            while i < len(lines) and lines[i].startswith("|"):
                out.append(row(lines[i], "td"))
                i += 1
            out += ["</tbody>", "</table></div>"]
            continue
        elif m := re.fullmatch(r"!\[(.*)\]\((.+)\)", line.strip()):
            alt, src = m.group(1), m.group(2)
            if images and src in images:
                # In lines of 76 characters: browsers drop whitespace in base64 data, and a page
                # embedded in reStructuredText (the report's front page) must keep its lines short.
                src = "data:image/png;base64,\n" + base64.encodebytes(images[src]).decode().strip()
            out.append(f'<p><img alt="{html.escape(alt)}" src="{src if src.startswith("data:") else html.escape(src)}"></p>')
        elif line.strip():
            out.append(f"<p>{html.escape(line)}</p>")
        i += 1
    return "\n".join(out + ["</body>", "</html>", ""])
