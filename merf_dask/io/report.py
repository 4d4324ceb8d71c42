"""The HTML report of a fit: convergence, random effects and feature importances, as PNG figures.

Plotting needs matplotlib (the ``plot`` extra); without it :func:`render_report` returns None and
the model directory simply has no report.

Functions
---------
render_report
    The report's files (``report.html`` and its PNGs) as bytes, keyed by file name.
"""

from __future__ import annotations

import html
import io

import numpy as np

__all__ = ["render_report", "REPORT"]

REPORT = "report.html"
#: Clusters drawn in the caterpillar plot; more would be unreadable (an even sample is drawn).
_CATERPILLAR_CLUSTERS = 60


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return buffer.getvalue()


def _convergence_figure(plt, state):
    iterations = [r.iteration for r in state.history]
    D_diag = np.array([np.diag(r.D) for r in state.history])
    figure, axes = plt.subplots(1, 3, figsize=(13, 3.5))
    axes[0].plot(iterations, [r.gll for r in state.history], marker="o")
    axes[0].set(title="generalised log-likelihood", xlabel="EM iteration")
    axes[1].plot(iterations, [r.sigma2 for r in state.history], marker="o")
    axes[1].set(title="sigma$^2$", xlabel="EM iteration")
    for j, name in enumerate(state.z_names):
        axes[2].plot(iterations, D_diag[:, j], marker="o", label=f"Var({name})")
    axes[2].set(title="diag(D)", xlabel="EM iteration")
    axes[2].legend()
    return figure


def _caterpillar_figure(plt, state):
    q = len(state.z_names)
    order = np.argsort(state.b[:, 0])
    shown = order[np.linspace(0, len(order) - 1, min(len(order), _CATERPILLAR_CLUSTERS)).astype(int)]
    figure, axes = plt.subplots(1, q, figsize=(4.5 * q, 0.12 * len(shown) + 1.5), squeeze=False)
    for j, name in enumerate(state.z_names):
        b = state.b[shown, j]
        half_width = 1.96 * np.sqrt(state.b_cov[shown, j, j])
        axes[0, j].errorbar(b, np.arange(len(shown)), xerr=half_width, fmt="o", markersize=3)
        axes[0, j].axvline(0, color="grey", linewidth=0.8)
        axes[0, j].set(title=f"b: {name} (95% intervals)", yticks=[])
    return figure


def _importance_figure(plt, state):
    importances = getattr(state.fe_model, "feature_importances_", None)
    if importances is None:
        return None
    order = np.argsort(importances)
    figure, axis = plt.subplots(figsize=(6, 0.35 * len(order) + 1))
    axis.barh(np.asarray(state.feature_names)[order], np.asarray(importances)[order])
    axis.set(title="feature importances of the fixed-effects learner")
    return figure


def render_report(state, *, summary: str) -> dict[str, bytes] | None:
    """Render the report of a fitted model.

    Parameters
    ----------
    state : merf_dask.core.state.ModelState
        A fitted model.
    summary : str
        The text summary shown at the top (``merf-dask show``'s output).

    Returns
    -------
    dict of str to bytes, or None
        ``report.html`` and its PNG files; None when matplotlib is not installed.
    """
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures = {"convergence.png": _convergence_figure(plt, state),
               "random_effects.png": _caterpillar_figure(plt, state),
               "importances.png": _importance_figure(plt, state)}
    files = {}
    for name, figure in figures.items():
        if figure is not None:
            files[name] = _png(figure)
            plt.close(figure)
    images = "\n".join(f'<h2>{name.removesuffix(".png").replace("_", " ")}</h2>'
                       f'<img src="{name}" alt="{name}">' for name in files)
    files[REPORT] = (
        "<!doctype html><html><head><meta charset='utf-8'><title>MERF fit report</title>"
        "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}"
        "img{max-width:100%}</style></head><body><h1>MERF fit report</h1>"
        f"<pre>{html.escape(summary)}</pre>{images}</body></html>").encode()
    return files
