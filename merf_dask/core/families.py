"""Response families of generalised mixed-effects forests: binary (logit) and counts (log).

A family maps the linear predictor eta = f(X) + sum_k Z_k b_k to the mean of y and gives what
the Laplace E-step (:mod:`merf_dask.core.laplace`) needs at every row: the log-density of y,
the working weight w = dmu/deta (the variance, both links being canonical) and its slope
dw/deta (the Laplace likelihood's correction to the EM updates). Gaussian fits do not use a
family (their E-step is exact).

Classes and functions
---------------------
Family
    One family: mean, weights, log-density, the check of y.
BINOMIAL, POISSON, FAMILIES
    The families by name.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.special import expit, gammaln

__all__ = ["Family", "BINOMIAL", "POISSON", "FAMILIES"]

#: The linear predictor is clipped here before exp: beyond, probabilities are 0 or 1 to double
#: precision and counts overflow.
_ETA_LIMIT = 700.0
#: Nodes and weights of the quadrature of a logistic mean over a normal random effect (error
#: below 1e-12 for standard deviations up to 10).
_GAUSS_HERMITE = np.polynomial.hermite.hermgauss(60)


@dataclass(frozen=True)
class Family:
    """A response family with its canonical link.

    Attributes
    ----------
    name : str
        ``"binomial"`` (y in {0, 1}, logit link) or ``"poisson"`` (counts, log link).
    """

    name: str

    def mean(self, eta: np.ndarray) -> np.ndarray:
        """E[y | eta], shape of ``eta``."""
        if self.name == "binomial":
            return expit(eta)
        return np.exp(np.clip(eta, -_ETA_LIMIT, _ETA_LIMIT))

    def averaged_mean(self, eta: np.ndarray, variance: np.ndarray) -> np.ndarray:
        """E[mu(eta + s)] over s ~ N(0, variance): the mean of a row whose random effects are
        drawn from their distribution (a new level's population-averaged prediction).

        Counts: exp(eta + variance / 2), exactly; binary: Gauss-Hermite quadrature.
        """
        if self.name == "poisson":
            return self.mean(eta + 0.5 * variance)
        mu, weights = _logistic_at_nodes(eta, variance)
        return (mu @ weights) / np.sqrt(np.pi)

    def mean_spread(self, eta: np.ndarray, variance: np.ndarray) -> np.ndarray:
        """The standard deviation of mu(eta + s) over s ~ N(0, variance): how uncertain the mean
        of a row is when its random effects are known up to that variance.

        Counts: mu(eta) exp(variance / 2) sqrt(exp(variance) - 1), exactly (a lognormal's
        spread); binary: Gauss-Hermite quadrature of E[mu^2] - E[mu]^2.

        Parameters
        ----------
        eta, variance : ndarray of shape (n_rows,)

        Returns
        -------
        ndarray of shape (n_rows,)
        """
        variance = np.asarray(variance, dtype=float)
        if self.name == "poisson":
            return self.mean(eta + 0.5 * variance) * np.sqrt(np.expm1(variance))
        mu, weights = _logistic_at_nodes(eta, variance)
        first, second = (mu @ weights) / np.sqrt(np.pi), (mu**2 @ weights) / np.sqrt(np.pi)
        return np.sqrt(np.maximum(second - first**2, 0.0))

    def weights(self, mu: np.ndarray) -> np.ndarray:
        """w = dmu/deta = Var(y | eta) at the means ``mu``."""
        return mu * (1.0 - mu) if self.name == "binomial" else mu

    def weight_slope(self, mu: np.ndarray) -> np.ndarray:
        """dw/deta at the means ``mu``."""
        return mu * (1.0 - mu) * (1.0 - 2.0 * mu) if self.name == "binomial" else mu

    def log_density(self, y: np.ndarray, eta: np.ndarray) -> np.ndarray:
        """log p(y | eta) of every row."""
        if self.name == "binomial":
            return y * eta - np.logaddexp(0.0, eta)
        eta = np.clip(eta, -_ETA_LIMIT, _ETA_LIMIT)
        return y * eta - np.exp(eta) - gammaln(y + 1.0)

    def link(self, mu: float) -> float:
        """eta at the mean ``mu`` (the start of a fit: the link of the mean of y)."""
        return float(np.log(mu / (1.0 - mu)) if self.name == "binomial" else np.log(mu))

    def response_summary(self, y: np.ndarray) -> np.ndarray:
        """A few values of ``y`` on which :meth:`check_response` says what it says of all of
        ``y``: summaries of blocks of rows, concatenated, check the whole response."""
        if self.name == "binomial":
            valid = (y == 0) | (y == 1)
            return np.concatenate([np.unique(y[valid]), y[~valid][:1]])
        fractional = y[y != np.round(y)][:1]
        return np.concatenate([[y.min(), y.max()], fractional]) if len(y) else fractional

    def check_response(self, y: np.ndarray, *, name: str = "y") -> None:
        """Refuse a response this family cannot model, naming the value.

        Raises
        ------
        ValueError
            Binomial: a value other than 0 and 1, or only one of them; Poisson: a negative or
            non-integer count, or all counts zero.
        """
        if self.name == "binomial":
            values = np.unique(y)
            bad = values[(values != 0) & (values != 1)]
            if len(bad):
                raise ValueError(f"{name} of a binomial fit must be 0 or 1 (two classes), got "
                                 f"{bad[0]!r}")
            if len(values) < 2:
                raise ValueError(f"{name} of a binomial fit has one class only ({values[0]!r} "
                                 "in every row): there is nothing to classify")
            return
        negative = y[y < 0]
        if len(negative):
            raise ValueError(f"{name} of a poisson fit must be counts (>= 0), got "
                             f"{negative[0]!r}")
        fractional = y[y != np.round(y)]
        if len(fractional):
            raise ValueError(f"{name} of a poisson fit must be whole counts, got "
                             f"{fractional[0]!r}")
        if not (y > 0).any():
            raise ValueError(f"{name} of a poisson fit is 0 in every row: the log of its mean "
                             "is minus infinity")


def _logistic_at_nodes(eta: np.ndarray, variance: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """expit(eta + s) at the Gauss-Hermite nodes of s ~ N(0, variance), shape (n_rows, n_nodes),
    and the nodes' weights: ``(mu @ weights) / sqrt(pi)`` is E[expit(eta + s)]."""
    nodes, weights = _GAUSS_HERMITE
    spread = np.sqrt(2.0 * np.asarray(variance))[..., None] * nodes
    return expit(np.asarray(eta)[..., None] + spread), weights


BINOMIAL = Family("binomial")
POISSON = Family("poisson")
#: Family by name (``MERF(family=...)``, ``merf-dask fit --family``).
FAMILIES = {family.name: family for family in (BINOMIAL, POISSON)}
