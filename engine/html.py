"""Self-contained HTML pages: sections of paragraphs, tables and matplotlib figures embedded as base64 PNG.

Presentation only (no engine imports), shared by the run report (engine.report) and the studies' report sections.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from dataclasses import dataclass, field

import matplotlib

matplotlib.use("Agg")  # figures are rendered to PNG only; import pyplot from here so this runs first
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

_CSS = """
body { font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; margin: 2em auto; max-width: 1200px;
       color: #222; line-height: 1.4; padding: 0 1em; }
h1 { border-bottom: 2px solid #446; padding-bottom: .3em; }
h2 { margin-top: 2em; color: #335; }
table { border-collapse: collapse; margin: 1em 0; font-size: 13px; }
th, td { border: 1px solid #ccd; padding: 3px 8px; text-align: right; }
th { background: #eef; }
td:first-child, th:first-child { text-align: left; }
.note { color: #555; font-size: 14px; }
.verdict { background: #f4f6ff; border-left: 4px solid #557; padding: .5em 1em; }
img { max-width: 100%; }
.fig { display: inline-block; vertical-align: top; max-width: 49%; margin-right: 1%; }
.fig.wide { max-width: 100%; }
.card { font-family: monospace; font-size: 12px; white-space: pre-wrap; background: #f7f7f7; padding: 1em; }
"""


@dataclass
class Section:
    """One report section: a heading, an optional paragraph, then tables and figures in order."""

    title: str
    text: str = ""
    blocks: list[str] = field(default_factory=list)

    def table(self, frame: pd.DataFrame, caption: str = "", float_format: str = "{:.3f}") -> Section:
        body = frame.to_html(float_format=lambda v: float_format.format(v), na_rep="–", border=0)
        cap = f"<p class='note'>{html.escape(caption)}</p>" if caption else ""
        self.blocks.append(cap + body)
        return self

    def figure(self, fig: plt.Figure, caption: str = "", wide: bool = False) -> Section:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        data = base64.b64encode(buf.getvalue()).decode()
        cap = f"<p class='note'>{html.escape(caption)}</p>" if caption else ""
        css = "fig wide" if wide else "fig"
        self.blocks.append(
            f"<div class='{css}'><img alt='{html.escape(caption)}' src='data:image/png;base64,{data}'/>{cap}</div>"
        )
        return self

    def paragraph(self, text: str, css: str = "") -> Section:
        cls = f" class='{css}'" if css else ""
        self.blocks.append(f"<p{cls}>{html.escape(text)}</p>")
        return self

    def preformatted(self, text: str) -> Section:
        self.blocks.append(f"<div class='card'>{html.escape(text)}</div>")
        return self

    def render(self) -> str:
        intro = f"<p>{html.escape(self.text)}</p>" if self.text else ""
        return f"<h2>{html.escape(self.title)}</h2>{intro}{''.join(self.blocks)}"


def render(title: str, sections: Sequence[Section], subtitle: str = "") -> str:
    """The whole page as one self-contained HTML string."""
    sub = f"<p class='note'>{html.escape(subtitle)}</p>" if subtitle else ""
    body = "".join(s.render() for s in sections)
    return (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>{sub}{body}</body></html>"
    )


__all__ = ["Section", "plt", "render"]
