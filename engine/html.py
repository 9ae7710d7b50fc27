"""Self-contained HTML pages: sections of paragraphs, tables and matplotlib figures embedded as base64 PNG.

Presentation only (no engine imports), shared by the run report (engine.report) and the studies' report sections.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import matplotlib

matplotlib.use("Agg")  # figures are rendered to PNG only; import pyplot from here so this runs first
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
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
table.heatmap td { white-space: nowrap; }
.verdict.holds { border-left-color: #2a7; }
.verdict.fails { border-left-color: #c33; }
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

    def heatmap(
        self,
        text: pd.DataFrame,
        values: pd.DataFrame,
        scales: Mapping[str, tuple[float, float, str]],
        caption: str = "",
    ) -> Section:
        """A table of ``text`` whose cells are coloured by ``values`` (same shape). Columns are (group, part)
        pairs; ``scales[part]`` = (vmin, vmax, matplotlib colormap) colours that part; NaN cells stay white."""
        groups = list(dict.fromkeys(g for g, _ in text.columns))
        head = "<tr><th></th>" + "".join(
            f"<th colspan='{sum(g == c[0] for c in text.columns)}'>{html.escape(str(g))}</th>" for g in groups
        )
        head += "</tr><tr><th></th>" + "".join(f"<th>{html.escape(str(p))}</th>" for _, p in text.columns) + "</tr>"
        body = []
        for label, row in text.iterrows():
            cells = [f"<th>{html.escape(str(label))}</th>"]
            for column in text.columns:
                cells.append(f"<td style='{_cell_style(values.loc[label, column], scales[column[1]])}'>"
                             f"{html.escape(str(row[column]))}</td>")  # fmt: skip
            body.append("<tr>" + "".join(cells) + "</tr>")
        cap = f"<p class='note'>{html.escape(caption)}</p>" if caption else ""
        self.blocks.append(f"{cap}<table class='heatmap'><thead>{head}</thead><tbody>{''.join(body)}</tbody></table>")
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


def _cell_style(value: float, scale: tuple[float, float, str]) -> str:
    """Background from the colormap at ``value`` within [vmin, vmax]; dark text on light colours, white on dark."""
    if value is None or not np.isfinite(value):
        return ""
    vmin, vmax, cmap = scale
    r, g, b, _ = matplotlib.colormaps[cmap](float(np.clip((value - vmin) / (vmax - vmin), 0.0, 1.0)))
    ink = "#000" if 0.299 * r + 0.587 * g + 0.114 * b > 0.55 else "#fff"
    return f"background:#{int(255 * r):02x}{int(255 * g):02x}{int(255 * b):02x};color:{ink};text-align:center"


def render(title: str, sections: Sequence[Section], subtitle: str = "") -> str:
    """The whole page as one self-contained HTML string."""
    sub = f"<p class='note'>{html.escape(subtitle)}</p>" if subtitle else ""
    body = "".join(s.render() for s in sections)
    return (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>{sub}{body}</body></html>"
    )


__all__ = ["Section", "plt", "render"]
