"""lme4-style model formulas, and the arrays they describe.

``MERF(formula="y ~ x1 + x2 + (1 + t | g)")`` names, in lme4's notation, the response ``y``, the
forest's features ``x1, x2``, the random-effect covariates (an intercept and ``t``) and the
grouping column ``g``. This module turns that text into column names, and a pandas partition into
the arrays the EM loop works on.

Contents
--------
FormulaSpec
    A parsed formula: the column of each role, and display names for the Z columns.
parse_formula
    Formula text -> ``FormulaSpec``, checked against the data's columns when they are given.
FeatureEncoder
    Feature columns -> float64 matrix, encoded the same way at fit and predict time. It fits from
    a pandas or a Dask DataFrame without gathering rows, and round-trips through JSON.
DesignMatrices, design_matrices
    One pandas frame (a partition) -> ``(X, Z, groups, y)``.

Parsing
-------
The text is read by formulae (bambi's parser, written for mixed-model formulas). Its
``model_description`` chains three stages: ``Scanner`` (text -> tokens), ``Parser`` (tokens ->
syntax tree) and ``Resolver`` (tree -> terms). We run the same three stages ourselves, because
``model_description`` alone cannot give us three things:

* ``.`` ("every other column") is not in formulae's grammar. We substitute the data's remaining
  columns for the ``.`` token, so formulae's own term algebra still handles ``. - x3``.
* It resolves ``(1 + t | g)`` and ``(1 | g) + (0 + t | g)`` to the same terms, although lme4
  reads the second as two uncorrelated effects. Counting ``|`` tokens tells them apart.
* Its parser returns after the first complete expression and drops the remaining tokens
  (``y ~ x1 x2`` silently loses ``x2``). Checking that the parser reached the end catches this.

Everything else comes from formulae: operator precedence, ``-``, backtick-quoted names, the
``0`` / ``1`` / ``-1`` intercept terms, and lme4's implicit random intercept in ``(t | g)``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import dask
import numpy as np
import pandas as pd
from formulae.parser import ParseError, Parser
from formulae.resolver import Resolver, ResolverError
from formulae.scanner import ScanError, Scanner
from formulae.terms import Intercept, Model, NegatedIntercept, Term, Variable
from formulae.terms.call_resolver import CallResolverError
from formulae.token import Token
from pandas.api.types import is_numeric_dtype
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.utils.validation import check_is_fitted

__all__ = ["FormulaSpec", "parse_formula", "FeatureEncoder", "DesignMatrices", "design_matrices"]

#: Stands in for ``.`` until the data's columns are known. A backtick ends a quoted name in
#: formula text, so no column written in a formula can have this name.
_EVERY_OTHER_COLUMN = "`.`"

#: How many available columns an unknown-column error lists.
_COLUMNS_SHOWN = 10


@dataclass(frozen=True)
class FormulaSpec:
    """The columns a formula assigns to each role.

    Attributes
    ----------
    text : str
        The formula as written.
    response : str
        Column of the response y.
    fixed : tuple of str
        Feature columns of the forest, in formula order (``.`` expanded in data order).
    random : tuple of str
        Random-slope columns of Z, in formula order. The random intercept is not a column.
    random_intercept : bool
        Whether Z starts with a column of ones.
    group : str
        Column whose values identify the clusters.
    """

    text: str
    response: str
    fixed: tuple[str, ...]
    random: tuple[str, ...]
    random_intercept: bool
    group: str

    @property
    def z_names(self) -> tuple[str, ...]:
        """Display names of the Z columns: ``"(Intercept)"`` first when there is one, as in lme4."""
        intercept = ("(Intercept)",) if self.random_intercept else ()
        return intercept + self.random

    @property
    def columns(self) -> tuple[str, ...]:
        """Every column the model reads, each once: response, features, slopes, group."""
        return tuple(dict.fromkeys((self.response, *self.fixed, *self.random, self.group)))


def parse_formula(text: str, *, columns: Sequence[str] | None = None) -> FormulaSpec:
    """Read an lme4-style formula such as ``"y ~ x1 + x2 + (1 + t | g)"``.

    Parameters
    ----------
    text : str
        ``response ~ features + (random part | group)``. Features are column names joined by
        ``+``; ``.`` means every column except the response and the group; ``1``, ``0`` and
        ``-1`` are accepted and ignored (a forest has no intercept). The random part follows
        lme4: ``(1 | g)`` is a random intercept, ``(1 + t | g)`` and ``(t | g)`` add a random
        slope on ``t``, ``(0 + t | g)`` and ``(-1 + t | g)`` are a slope without intercept.
        Names that are not identifiers can be quoted with backticks, as in
        ``y ~ `my col` + (1 | g)``.
    columns : sequence of str, optional
        The data's columns. Needed to expand ``.``; when given, every column the formula names
        must be one of them.

    Returns
    -------
    FormulaSpec

    Raises
    ------
    ValueError
        Naming the formula, when it does not parse, names unknown columns, has no feature, has
        interactions or transformations among the features, or has more than one random term
        or grouping factor.

    Notes
    -----
    formulae rejects ``(t - 1 | g)``, lme4's other spelling of a slope without intercept: write
    ``(0 + t | g)``.
    """
    if not isinstance(text, str):
        raise TypeError(f"formula must be a string, got {type(text).__name__}")
    tokens = _scan(text)
    # '.' excludes the response and the group, which only parsing reveals: parse once with a
    # placeholder for '.', then again with the columns it stands for
    model = _resolve(text, _substitute_period(tokens, [_EVERY_OTHER_COLUMN]))
    if sum(token.kind == "PIPE" for token in tokens) > 1:
        raise _invalid(text, "multiple random-effects terms are not supported yet: write one "
                             "term such as (1 + t | group)")
    spec = _spec_from_model(text, model)
    if _EVERY_OTHER_COLUMN in (spec.response, *spec.random, spec.group):
        raise _invalid(text, "'.' can only stand for features, on the right of '~' and outside "
                             "the random term")
    if _EVERY_OTHER_COLUMN in spec.fixed:
        if columns is None:
            raise _invalid(text, "'.' means every column except the response and the group: "
                                 "pass columns= to expand it")
        others = [name for name in columns if name not in (spec.response, spec.group)]
        if not others:
            raise _invalid(text, "'.' expands to no column: the data has only the response and "
                                 "the group")
        spec = _spec_from_model(text, _resolve(text, _substitute_period(tokens, others)))
    if not spec.fixed:
        raise _invalid(text, "the forest needs at least one feature column, "
                             f"as in '{spec.response} ~ x1 + ...'")
    if columns is not None:
        _require_columns(spec.columns, columns, context=f"invalid formula {text!r}")
    return spec


def _invalid(text: str, reason: str) -> ValueError:
    return ValueError(f"invalid formula {text!r}: {reason}")


def _scan(text: str) -> list[Token]:
    if not text.strip():
        raise _invalid(text, "the formula is empty")
    try:
        tokens = Scanner(text).scan()
    except ScanError as error:
        raise _invalid(text, str(error)) from None
    if tokens[0].kind == "TILDE" or not any(token.kind == "TILDE" for token in tokens):
        raise _invalid(text, "write 'response ~ features + (1 | group)'")
    return tokens


def _substitute_period(tokens: list[Token], names: Sequence[str]) -> list[Token]:
    """``tokens`` with each ``.`` token replaced by ``(name_1 + ... + name_k)``."""
    expansion = [Token("LEFT_PAREN", "(")]
    for position, name in enumerate(names):
        if position:
            expansion.append(Token("PLUS", "+"))
        # a quoted name reaches formulae without rescanning, so any column name is safe here
        expansion.append(Token("BQNAME", f"`{name}`"))
    expansion.append(Token("RIGHT_PAREN", ")"))
    return [new for token in tokens for new in (expansion if token.kind == "PERIOD" else [token])]


def _resolve(text: str, tokens: list[Token]) -> Model:
    parser = Parser(tokens)
    try:
        tree = parser.parse()
    except ParseError as error:
        reason = "unexpected end of formula" if parser.peek().kind == "EOF" else str(error)
        raise _invalid(text, reason) from None
    if not parser.at_end():
        raise _invalid(text, f"unexpected {parser.peek().lexeme!r}")
    try:
        return Resolver(tree).resolve()
    except (ResolverError, CallResolverError, ValueError) as error:
        raise _invalid(text, str(error)) from None
    except TypeError as error:
        # formulae's term algebra raises TypeError on misplaced terms, such as '(1 | 1)'
        raise _invalid(text, f"these terms cannot be combined ({error})") from None


def _spec_from_model(text: str, model: Model) -> FormulaSpec:
    response = _plain_column(model.response.term)
    if response is None:
        raise _invalid(text, f"the response {model.response.term.name!r} must be a column: add "
                             "a transformed column to the data instead")
    fixed = _feature_columns(text, model)
    group, random_intercept, slopes = _random_part(text, model)
    if response in (*fixed, *slopes, group):
        raise _invalid(text, f"the response {response!r} is also used on the right of '~'")
    return FormulaSpec(text=text, response=response, fixed=fixed, random=slopes,
                       random_intercept=random_intercept, group=group)


def _feature_columns(text: str, model: Model) -> tuple[str, ...]:
    fixed = []
    for term in model.common_terms:
        if isinstance(term, (Intercept, NegatedIntercept)):
            continue
        name = _plain_column(term)
        if name is None:
            raise _invalid(text, f"feature {term.name!r} is not a column: the forest finds "
                                 "interactions and transformations itself, so list columns only")
        fixed.append(name)
    return tuple(fixed)


def _random_part(text: str, model: Model) -> tuple[str, bool, tuple[str, ...]]:
    """The group column, whether there is a random intercept, and the random-slope columns."""
    group_terms = model.group_terms
    if not group_terms:
        raise _invalid(text, "no random-effects term: add one such as (1 | group)")
    factors = list(dict.fromkeys(term.factor.name for term in group_terms))
    if len(factors) > 1 or len(group_terms[0].factor.components) > 1:
        raise _invalid(text, f"nested or crossed grouping factors ({', '.join(factors)}) are not "
                             "supported yet: group by one column (for nested groups, a column "
                             "that combines them)")
    group = _plain_column(group_terms[0].factor)
    if group is None:
        raise _invalid(text, f"the grouping factor {factors[0]!r} must be a column")
    random_intercept = False
    slopes = []
    for term in group_terms:
        if isinstance(term.expr, Intercept):
            random_intercept = True
            continue
        name = _plain_column(term.expr)
        if name is None:
            raise _invalid(text, f"random slope {term.expr.name!r} must be a column")
        slopes.append(name)
    return group, random_intercept, tuple(slopes)


def _plain_column(term) -> str | None:
    """The column a term reads when it is a bare column name, else None."""
    if isinstance(term, Term) and len(term.components) == 1:
        (component,) = term.components
        # formulae turns a number such as the '2' in 'x + 2' into a Variable named 2
        if (isinstance(component, Variable) and component.reference is None
                and isinstance(component.name, str)):
            return component.name
    return None


def _require_columns(required: Iterable[str], available: Sequence[str], *, context: str) -> None:
    present = set(available)
    missing = [name for name in required if name not in present]
    if missing:
        shown = ", ".join(map(repr, list(available)[:_COLUMNS_SHOWN]))
        if len(available) > _COLUMNS_SHOWN:
            shown += f", ... ({len(available)} in all)"
        noun = "columns" if len(missing) > 1 else "column"
        raise ValueError(f"{context}: no {noun} named {', '.join(map(repr, missing))} in the "
                         f"data; its columns are {shown}")


class FeatureEncoder(TransformerMixin, BaseEstimator):
    """Encode feature columns as a float64 matrix, the same way at fit and at predict time.

    Numeric and boolean columns become floats; their missing values stay NaN. String, object
    and categorical columns become integer codes: the value's position among the categories
    seen at fit, sorted. Values not seen at fit and missing values become -1, one extra
    category below all others.

    Every column of the frame given to ``fit`` is a feature, so select the features first
    (``frame[list(spec.fixed)]``, lazy on Dask). ``fit`` accepts a Dask DataFrame and computes
    only the distinct values of the non-numeric columns; ``transform`` works on one pandas
    frame (a partition).

    Attributes
    ----------
    feature_names_in_ : ndarray of str, shape (n_features_in_,)
        Feature columns, in the order of the encoded matrix's columns.
    n_features_in_ : int
    categories_ : dict of str to list
        The sorted categories of each non-numeric feature; numeric features are absent.
    """

    def fit(self, frame) -> FeatureEncoder:
        """Learn the feature columns and the categories of the non-numeric ones.

        Parameters
        ----------
        frame : pandas.DataFrame or dask.dataframe.DataFrame
            The feature columns.

        Returns
        -------
        FeatureEncoder
            ``self``.

        Raises
        ------
        ValueError
            Naming the column, for date, time or period values, or a column mixing types that
            cannot be sorted (such as strings and numbers).
        """
        for name, dtype in frame.dtypes.items():
            if dtype.kind in "mM" or isinstance(dtype, pd.PeriodDtype):
                raise ValueError(f"feature column {name!r} holds {dtype} values: convert it to "
                                 "numbers first (for example seconds since a reference time)")
        categorical = [name for name, dtype in frame.dtypes.items() if not is_numeric_dtype(dtype)]
        # one dask.compute reads the data once for all columns; pandas objects pass through as is
        distinct = dask.compute(*(frame[name].dropna().drop_duplicates() for name in categorical))
        return self._set_fitted(
            frame.columns,
            {name: _sorted_categories(name, values) for name, values in zip(categorical, distinct)})

    def transform(self, frame: pd.DataFrame) -> np.ndarray:
        """Encode the feature columns of one pandas frame.

        Parameters
        ----------
        frame : pandas.DataFrame of shape (n_samples, n_columns)
            Has every column of ``feature_names_in_``; other columns are ignored.

        Returns
        -------
        ndarray of shape (n_samples, n_features_in_), dtype float64
        """
        check_is_fitted(self)
        if not isinstance(frame, pd.DataFrame):
            raise TypeError(f"transform encodes one pandas DataFrame, got {type(frame).__name__}; "
                            "for a Dask DataFrame, call it on each partition")
        _require_columns(self.feature_names_in_, frame.columns, context="FeatureEncoder")
        encoded = np.empty((len(frame), self.n_features_in_), dtype=np.float64)
        for position, name in enumerate(self.feature_names_in_):
            column = frame[name]
            if name in self.categories_:
                encoded[:, position] = pd.Index(self.categories_[name]).get_indexer(column)
            elif is_numeric_dtype(column.dtype):
                encoded[:, position] = column.to_numpy(dtype=np.float64, na_value=np.nan)
            else:
                raise ValueError(f"feature column {name!r} was numeric at fit but holds "
                                 f"{column.dtype} values now")
        return encoded

    def to_dict(self) -> dict:
        """The fitted state as plain lists and dicts, ready for ``json.dumps``.

        Returns
        -------
        dict
            ``{"feature_names_in": [name, ...], "categories": {name: [category, ...]}}``.
        """
        check_is_fitted(self)
        return {"feature_names_in": self.feature_names_in_.tolist(),
                "categories": {name: list(values) for name, values in self.categories_.items()}}

    @classmethod
    def from_dict(cls, state: Mapping) -> FeatureEncoder:
        """A fitted encoder from the output of ``to_dict``.

        Parameters
        ----------
        state : mapping
            What ``to_dict`` returned, possibly after a JSON round trip.

        Returns
        -------
        FeatureEncoder
        """
        return cls()._set_fitted(state["feature_names_in"], state["categories"])

    def _set_fitted(self, names: Iterable[str], categories: Mapping[str, list]) -> FeatureEncoder:
        self.feature_names_in_ = np.asarray(list(names), dtype=object)
        self.n_features_in_ = len(self.feature_names_in_)
        self.categories_ = {name: list(values) for name, values in categories.items()}
        return self


def _sorted_categories(name: str, values: pd.Series) -> list:
    """The distinct values of a column as sorted, JSON-serialisable Python scalars."""
    categories = values.tolist()
    unsupported = sorted({type(value).__name__ for value in categories
                          if not isinstance(value, (str, int, float))})
    if unsupported:
        raise ValueError(f"feature column {name!r} holds {', '.join(unsupported)} values: "
                         "convert it to numbers or strings first")
    try:
        return sorted(categories)
    except TypeError:
        kinds = ", ".join(sorted({type(value).__name__ for value in categories}))
        raise ValueError(f"feature column {name!r} mixes {kinds} values: convert it to one "
                         "type first") from None


class DesignMatrices(NamedTuple):
    """The arrays one frame contributes to the model (n_samples rows each).

    Attributes
    ----------
    X : ndarray of shape (n_samples, n_features), dtype float64
        Encoded features.
    Z : ndarray of shape (n_samples, n_random), dtype float64
        Random-effect covariates, in the order of ``FormulaSpec.z_names``.
    groups : ndarray of shape (n_samples,)
        Values of the grouping column.
    y : ndarray of shape (n_samples,), dtype float64, or None
        The response; None when the frame has no response column and none was required.
    """

    X: np.ndarray
    Z: np.ndarray
    groups: np.ndarray
    y: np.ndarray | None


def design_matrices(frame: pd.DataFrame, spec: FormulaSpec, encoder: FeatureEncoder, *,
                    require_response: bool = True) -> DesignMatrices:
    """The arrays a formula describes, from one pandas frame (a partition).

    Parameters
    ----------
    frame : pandas.DataFrame of shape (n_samples, n_columns)
    spec : FormulaSpec
    encoder : FeatureEncoder
        Fitted on ``spec.fixed``.
    require_response : bool, default=True
        Whether the response column must be present and complete (True to fit; False to
        predict, when y is returned only if the frame has it).

    Returns
    -------
    DesignMatrices
        ``(X, Z, groups, y)``.

    Raises
    ------
    ValueError
        Naming the column, when a column is missing, a random-slope column is not numeric or has
        missing values, or a required response is not numeric or has missing values.
    """
    check_is_fitted(encoder)
    if tuple(encoder.feature_names_in_) != spec.fixed:
        raise ValueError(f"the encoder was fitted on features {encoder.feature_names_in_.tolist()} "
                         f"but formula {spec.text!r} has {list(spec.fixed)}")
    required = [name for name in spec.columns if require_response or name != spec.response]
    _require_columns(required, frame.columns, context=f"formula {spec.text!r}")

    intercept = [np.ones(len(frame))] if spec.random_intercept else []
    slopes = [_numeric_column(frame, name, role="random-slope", complete=True)
              for name in spec.random]
    y = None
    if spec.response in frame.columns:
        y = _numeric_column(frame, spec.response, role="response", complete=require_response)
    return DesignMatrices(X=encoder.transform(frame), Z=np.column_stack(intercept + slopes),
                          groups=frame[spec.group].to_numpy(), y=y)


def _numeric_column(frame: pd.DataFrame, name: str, *, role: str, complete: bool) -> np.ndarray:
    """Column ``name`` as float64; ``complete`` rejects missing values."""
    dtype = frame[name].dtype
    if not is_numeric_dtype(dtype):
        raise ValueError(f"{role} column {name!r} holds {dtype} values; it must be numeric")
    values = frame[name].to_numpy(dtype=np.float64, na_value=np.nan)
    missing = int(np.isnan(values).sum()) if complete else 0
    if missing:
        raise ValueError(f"{role} column {name!r} has {missing} missing values; drop or fill "
                         "those rows first")
    return values
