"""Scores of predictions that add across partitions: partial sums per block of rows, finished
on the driver.

Gaussian models: MSE and R^2. Binary models: log loss, the area under the ROC curve and the
Brier score; the AUC comes from histograms of the predicted probabilities of positives and
negatives on a fine fixed grid (pairs within one bin of width 2^-16 count one half, so it is
exact to that resolution; sklearn's AUC of the same rows differs by less than 1e-4 in tests).
Count models: the mean Poisson deviance and MSE.

Functions
---------
partial_scores
    One block's sums.
finish_scores
    The scores from the sums of any number of blocks.
"""

from __future__ import annotations

import numpy as np
from scipy.special import xlogy

__all__ = ["partial_scores", "finish_scores", "score_names"]

_AUC_BINS = 1 << 16
#: Probabilities are clipped here for the log loss (sklearn's ``log_loss`` does the same).
_EPS = 1e-15


def score_names(family: str) -> list[str]:
    """The scores :func:`finish_scores` gives for ``family``."""
    return {"gaussian": ["MSE", "R2"], "binomial": ["log_loss", "AUC", "Brier"],
            "poisson": ["deviance", "MSE"]}[family]


def partial_scores(y: np.ndarray, prediction: np.ndarray, family: str) -> dict:
    """Sums over one block's rows that :func:`finish_scores` turns into scores.

    Parameters
    ----------
    y : ndarray of shape (n_rows,)
    prediction : ndarray of shape (n_rows,)
        The prediction of y (a probability for binary models, a mean for counts).
    family : {"gaussian", "binomial", "poisson"}

    Returns
    -------
    dict of str to float or ndarray
        Sums that add key by key across blocks.
    """
    error = y - prediction
    sums = {"n": float(len(y)), "sse": float(error @ error)}
    if family == "gaussian":
        sums.update(sum_y=float(y.sum()), sum_y2=float(y @ y))
    elif family == "binomial":
        p = np.clip(prediction, _EPS, 1 - _EPS)
        sums["log_loss"] = float(-np.sum(y * np.log(p) + (1 - y) * np.log1p(-p)))
        bins = np.minimum((prediction * _AUC_BINS).astype(np.int64), _AUC_BINS - 1)
        sums["positives"] = np.bincount(bins[y == 1], minlength=_AUC_BINS).astype(float)
        sums["negatives"] = np.bincount(bins[y == 0], minlength=_AUC_BINS).astype(float)
    else:
        sums["deviance"] = float(2 * np.sum(xlogy(y, y / prediction) - (y - prediction)))
    return sums


def finish_scores(sums: dict, family: str) -> dict[str, float]:
    """The scores of the rows whose :func:`partial_scores` were added into ``sums``."""
    n = sums["n"]
    if family == "gaussian":
        total = sums["sum_y2"] - sums["sum_y"] ** 2 / n
        return {"MSE": sums["sse"] / n, "R2": 1 - sums["sse"] / total if total > 0 else np.nan}
    if family == "poisson":
        return {"deviance": sums["deviance"] / n, "MSE": sums["sse"] / n}
    positives, negatives = sums["positives"], sums["negatives"]
    below = np.cumsum(negatives) - negatives  # negatives in lower bins
    pairs = positives.sum() * negatives.sum()
    auc = float((positives @ below + 0.5 * positives @ negatives) / pairs) if pairs else np.nan
    return {"log_loss": sums["log_loss"] / n, "AUC": auc, "Brier": sums["sse"] / n}
