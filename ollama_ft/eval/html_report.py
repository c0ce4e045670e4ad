"""report.html: the eval report as one self-contained page that opens offline.

Rendered from report.md with markdown-it-py (CommonMark + tables; raw HTML in the markdown is
escaped, not passed through), so the page always says what the markdown says. Each image that names
a file in the report directory is embedded as a base64 data URI; nothing is loaded from anywhere
else (no scripts, fonts or stylesheets: the CSS is inline).
"""

from __future__ import annotations

import base64
import html
from pathlib import Path

from ..core.runs import atomic_write_text

_CSS = """
body { font: 15px/1.5 system-ui, sans-serif; max-width: 72rem; margin: 2rem auto; padding: 0 1rem; color: #222; }
h1 { font-size: 1.6rem; } h2 { font-size: 1.25rem; margin-top: 2rem; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: .5rem 0 1rem; font-size: 13px; }
th, td { border: 1px solid #ccc; padding: .25rem .5rem; text-align: left; vertical-align: top; }
th { background: #f3f3f3; } tr:nth-child(even) td { background: #fafafa; }
img { max-width: 100%; border: 1px solid #eee; }
code { background: #f3f3f3; padding: 0 .2rem; }
"""

_MIME = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".svg": "image/svg+xml"}


def render_html(markdown: str, base_dir: Path, title: str) -> str:
    """The whole page for `markdown`; images under base_dir become data URIs, other image sources are dropped."""
    from markdown_it import MarkdownIt

    md = MarkdownIt("commonmark", {"html": False}).enable("table")
    tokens = md.parse(markdown)
    for tok in tokens:
        for child in tok.children or []:
            if child.type == "image":
                child.attrSet("src", _data_uri(base_dir, str(child.attrGet("src") or "")))
            elif child.type == "link_open":
                href = str(child.attrGet("href") or "")
                if "://" in href or href.startswith("//"):
                    child.attrSet("href", "#")  # the page must not reach out; the text still shows the address
    body = md.renderer.render(tokens, md.options, {})
    return (f"<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
            f"<title>{html.escape(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n{body}</body>\n</html>\n")


def _data_uri(base_dir: Path, src: str) -> str:
    p = (base_dir / src).resolve()
    mime = _MIME.get(p.suffix.lower())
    if "://" in src or mime is None or not p.is_file() or base_dir.resolve() not in p.parents:
        return ""
    return f"data:{mime};base64," + base64.b64encode(p.read_bytes()).decode("ascii")


def write_html(markdown: str, out: Path, title: str) -> Path:
    path = Path(out) / "report.html"
    atomic_write_text(path, render_html(markdown, Path(out), title))
    return path
