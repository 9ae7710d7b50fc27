"""The audit report's figures: ROC curves of detectors, feature log-likelihood by depth, and PCA projections of
clean vs adversarial features."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from engine.html import plt


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


def loglik_figure(tables: Sequence[tuple[str, pd.DataFrame]]) -> plt.Figure:
    """Mean feature log-likelihood by layer depth, one panel per dataset: clean images under their class's
    mixtures, plain and HFC AEs under the target class's (symlog scale: plain AEs fall by orders of magnitude)."""
    colours = {"clean": "#3a7", "plain AE": "#d33", "HFC AE": "#36c"}
    fig, axes = plt.subplots(1, len(tables), figsize=(5.2 * len(tables), 3.8), squeeze=False)
    for ax, (title, table) in zip(axes[0], tables, strict=True):
        depth = np.arange(len(table))
        for name in table.columns:
            ax.plot(depth, table[name], marker="o", ms=3, color=colours.get(name), label=name)
        ax.set_yscale("symlog")
        ax.set(title=title, xlabel="constrained layer (input -> output)", ylabel="mean log-likelihood")
        ax.set_xticks(depth, table.index, rotation=90, fontsize=6)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
