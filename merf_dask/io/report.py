"""The HTML report of a fit: convergence, random effects and feature importances, as PNG figures.

Plotting needs matplotlib (the ``plot`` extra); without it :func:`render_report` returns None and
the model directory simply has no report.

Functions
---------
render_report
    The report's files (``report.html`` and its PNGs) as bytes, keyed by file name.
format_variance_components
    The variance components as lme4 prints them (the summary's table).
"""

from __future__ import annotations

import html
import io

import numpy as np

__all__ = ["render_report", "format_variance_components", "REPORT"]

REPORT = "report.html"
#: Clusters drawn in the caterpillar plot; more would be unreadable (an even sample is drawn).
_CATERPILLAR_CLUSTERS = 60


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return buffer.getvalue()


def _convergence_figure(plt, state):
    iterations = [r.iteration for r in state.history]
    gaussian = state.sigma2 is not None  # binary and count fits have no residual variance
    figure, axes = plt.subplots(1, 3 if gaussian else 2, figsize=(13 if gaussian else 9, 3.5))
    axes[0].plot(iterations, [r.gll for r in state.history], marker="o")
    axes[0].set(title="generalised log-likelihood", xlabel="EM iteration")
    if gaussian:
        axes[1].plot(iterations, [r.sigma2 for r in state.history], marker="o")
        axes[1].set(title="sigma$^2$", xlabel="EM iteration")
    for k, effects in enumerate(state.effects):
        D_diag = np.array([np.diag(r.D[k]) for r in state.history])
        for j, name in enumerate(effects.factor.z_names):
            axes[-1].plot(iterations, D_diag[:, j], marker="o",
                          label=f"Var({name} | {effects.factor.name})")
    axes[-1].set(title="diag(D)", xlabel="EM iteration")
    axes[-1].legend()
    return figure


def _caterpillar_figure(plt, state):
    """One row of panels per factor, one panel per Z column: b with 95% intervals."""
    q = max(e.factor.q for e in state.effects)
    shown = {}
    for e in state.effects:
        order = np.argsort(e.b[:, 0])
        shown[e.factor.name] = order[np.linspace(0, len(order) - 1, min(
            len(order), _CATERPILLAR_CLUSTERS)).astype(int)]
    height = sum(0.12 * len(rows) + 1.5 for rows in shown.values())
    figure, axes = plt.subplots(len(state.effects), q, figsize=(4.5 * q, height), squeeze=False)
    for k, e in enumerate(state.effects):
        rows = shown[e.factor.name]
        for j in range(q):
            axis = axes[k, j]
            if j >= e.factor.q:
                axis.axis("off")
                continue
            half_width = 1.96 * np.sqrt(e.b_cov[rows, j, j])
            axis.errorbar(e.b[rows, j], np.arange(len(rows)), xerr=half_width, fmt="o",
                          markersize=3)
            axis.axvline(0, color="grey", linewidth=0.8)
            axis.set(title=f"{e.factor.name}: {e.factor.z_names[j]} (95% intervals)", yticks=[])
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


def format_variance_components(components) -> list[str]:
    """lme4's print of ``VarCorr``: groups, names, variances, standard deviations and
    correlations, one line per Z column and the residual.

    Parameters
    ----------
    components : pandas.DataFrame
        In the layout of ``as.data.frame(VarCorr(m))``
        (:func:`merf_dask.core.random_effects.variance_components`).

    Returns
    -------
    list of str
    """
    lines = [f" {'Groups':<12}{'Name':<16}{'Variance':>10}{'Std.Dev.':>10}  Corr"]
    for group, rows in components.groupby("grp", sort=False):
        variances = rows[rows["var2"].isna()]
        correlation = {(row.var1, row.var2): row.sdcor
                       for row in rows[rows["var2"].notna()].itertuples()}
        for position, row in enumerate(variances.itertuples()):
            name = row.var1 if isinstance(row.var1, str) else ""  # the Residual has none
            corr = " ".join(f"{correlation[(earlier, name)]:+.2f}"
                            for earlier in variances["var1"].iloc[:position])
            lines.append(f" {group if position == 0 else '':<12}{name:<16}"
                         f"{row.vcov:>10.4g}{row.sdcor:>10.4g}  {corr}".rstrip())
    return lines


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
