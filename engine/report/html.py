"""Self-contained HTML reports: tables from long-format rows, matplotlib figures embedded as base64 PNG."""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import matplotlib

matplotlib.use("Agg")
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


def roc_figure(curves: Sequence[tuple[str, str, np.ndarray, np.ndarray]], title: str) -> plt.Figure:
    """ROC curves from (name, variant, fpr, tpr): one colour per name, solid for the first variant, dashed after."""
    fig, ax = plt.subplots(figsize=(5.0, 4.2))
    colours: dict[str, str] = {}
    variants: list[str] = []
    for name, variant, fpr, tpr in curves:
        colour = colours.setdefault(name, f"C{len(colours) % 10}")
        if variant not in variants:
            variants.append(variant)
        style = "-" if variants.index(variant) == 0 else "--"
        ax.plot(fpr, tpr, color=colour, ls=style, lw=1.4, label=f"{name} {variant}")
    ax.plot([0, 1], [0, 1], color="#999", lw=0.8, ls=":")
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=title, xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    return fig


def projection_figure(panels: Sequence[tuple[str, dict[str, np.ndarray]]]) -> plt.Figure:
    """2-D PCA scatter per panel; each panel maps group name ("clean", "plain AE", "HFC AE") to (n, d) features.

    The projection is fitted on the clean features of the panel, so AEs that leave the clean distribution show
    as outliers and AEs hidden by HFC fall inside it.
    """
    colours = {"clean": "#3a7", "plain AE": "#d33", "HFC AE": "#36c"}
    fig, axes = plt.subplots(1, len(panels), figsize=(4.4 * len(panels), 4.0), squeeze=False)
    for ax, (title, groups) in zip(axes[0], panels, strict=True):
        clean = groups["clean"]
        mean = clean.mean(0)
        _, _, vt = np.linalg.svd(clean - mean, full_matrices=False)
        basis = vt[:2].T if vt.shape[0] >= 2 else np.pad(vt.T, ((0, 0), (0, 1)))
        for name, feats in groups.items():
            xy = (feats - mean) @ basis
            ax.scatter(xy[:, 0], xy[:, 1], s=8, alpha=0.6, label=name, color=colours.get(name))
        ax.set(title=title, xlabel="PC 1 (of clean)", ylabel="PC 2")
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def line_figure(frame: pd.DataFrame, x: str, y: str, hue: str, title: str, ylabel: str = "") -> plt.Figure:
    """One line per ``hue`` value of ``y`` against ``x``."""
    fig, ax = plt.subplots(figsize=(5.0, 3.6))
    for name, group in frame.groupby(hue, sort=False):
        group = group.sort_values(x)
        ax.plot(group[x], group[y], marker="o", ms=3, label=str(name))
    ax.set(title=title, xlabel=x, ylabel=ylabel or y)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def pivot(rows: Sequence[dict[str, Any]], index: Sequence[str], columns: Sequence[str], metric: str) -> pd.DataFrame:
    """Wide table of ``metric`` values from long-format rows."""
    frame = pd.DataFrame([r for r in rows if r["metric"] == metric])
    if frame.empty:
        return frame
    return frame.pivot_table(index=list(index), columns=list(columns), values="value", aggfunc="first")
