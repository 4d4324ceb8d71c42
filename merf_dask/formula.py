"""lme4-style model formulas, and the arrays they describe.

``MERF(formula="y ~ x1 * x2 + log(x3) + (1 + t | g) + (1 | h)")`` names, in lme4's notation, the
response ``y``, the fixed part (``x1``, ``x2``, their interaction and ``log(x3)``), and random
terms: a random intercept and slope on ``t`` for every level of ``g``, and a random intercept for
every level of ``h``. This module turns that text into a :class:`FormulaSpec`, learns from the
data what the arrays need (categorical levels, means and standard deviations), and turns a pandas
frame (a partition) into the arrays the EM loop works on.

Contents
--------
RandomTerm, FormulaSpec
    A parsed formula: the response, the fixed part's terms, and one ``RandomTerm`` per
    ``(... | factor)`` block after lme4's expansion of ``/`` and ``||``.
parse_formula
    Formula text -> ``FormulaSpec``, checked against the data's columns when they are given.
FeatureEncoder
    Feature columns -> float64 matrix as a tree learner takes them: numbers as they are, strings
    as sorted codes. It fits from a pandas or a Dask DataFrame and round-trips through JSON.
FactorDesign, DesignMatrices, ModelDesign
    ``ModelDesign(spec).fit(frame, full_design=...)`` learns from every row, without gathering
    them, what the design needs; ``transform`` turns one pandas frame into ``(X, y, groups, Z)``
    (one ``groups`` and one ``Z`` per grouping factor); ``to_dict`` / ``from_dict`` round-trip
    the fitted design through JSON.

What the formula means (lme4's semantics)
-----------------------------------------
* Random terms: ``(1 | g)``; ``(1 + t | g)`` and ``(t | g)`` (correlated intercept and slope);
  ``(0 + t | g)`` (slope only); ``(1 | a:b)`` (the interaction factor, levels ``"a1:b1"``...);
  ``(1 | a/b)`` = ``(1 | a) + (1 | a:b)``; ``(1 + t || g)`` = ``(1 | g) + (0 + t | g)``
  (uncorrelated). Terms of one factor are uncorrelated blocks of its covariance
  (:attr:`FactorDesign.blocks`). A slope is a column or a function of columns (``scale(t)``).
* Categorical columns (strings, categoricals, or any column in ``C()`` / ``factor()``) are
  treatment-coded as in R: the first level, sorted, is the reference. In ``(1 + f | g)`` the
  slopes are the other levels (``fb``, ``fc``); in ``(0 + f | g)`` every level has a column.
* Fixed part: ``a * b`` = ``a + b + a:b``, ``-`` removes terms, ``.`` is every column but the
  response and the grouping columns, ``C(x)`` / ``factor(x)``, ``I(x ** 2)`` (any arithmetic),
  the functions of :data:`NUMPY_FUNCTIONS` (also as ``np.log``), and the stateful ``scale(x)``
  and ``center(x)``, whose mean and standard deviation (n - 1, as R's ``scale``) are learned at
  fit and reused at predict time. ``0`` / ``1`` / ``-1`` are accepted and ignored: every
  learner fits its own intercept.
* What a learner gets (``full_design``): a tree learner gets the columns the fixed part reads,
  encoded by :class:`FeatureEncoder` (trees find interactions and transformations themselves);
  a linear learner gets the design R's ``model.matrix`` builds for lmer's fixed part, without
  the intercept column (the learner fits it): R's rules for coding factors by contrasts or by
  indicators, interaction columns, lme4's column names (``x1:x2``, ``fb``, ``log(x3)``).

Parsing
-------
The text is read by formulae (bambi's parser). Its ``model_description`` chains three stages:
``Scanner`` (text -> tokens), ``Parser`` (tokens -> syntax tree) and ``Resolver`` (tree ->
terms). We run them ourselves, because formulae's own reading differs from lme4's:

* ``.`` ("every other column") is not in formulae's grammar. We substitute the data's remaining
  columns for the ``.`` token, so formulae's own term algebra still handles ``. - x3``.
* It merges every random term into one set of terms, so that ``(1 + t | g)`` and
  ``(1 | g) + (0 + t | g)`` (two uncorrelated effects in lme4) read alike, a repeated term
  vanishes, and ``(1 + 0 + t | g)`` keeps its intercept. We split the right-hand side's sum
  ourselves: formulae resolves the fixed part, and each random term is read by
  :func:`_random_terms`.
* ``||`` is not in its grammar either: the scanner's two ``|`` tokens become one ``||`` token.
* Its parser returns after the first complete expression and drops the remaining tokens
  (``y ~ x1 x2`` silently loses ``x2``). Checking that the parser reached the end catches this.
* It evaluates calls in Python's namespace and learns ``scale``'s mean from the one frame it
  sees. We keep each call as an expression (:data:`Expr`) that we evaluate ourselves, on pandas
  partitions or lazily on a Dask DataFrame, with a fixed set of functions.
"""

from __future__ import annotations

import itertools
import logging
import math
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import dask
import numpy as np
import pandas as pd
from formulae import expr as syntax
from formulae.parser import ParseError, Parser
from formulae.resolver import Resolver, ResolverError
from formulae.scanner import ScanError, Scanner
from formulae.terms import Call, Model, Term, Variable
from formulae.terms.call_resolver import (CallResolver, CallResolverError, LazyCall, LazyOperator,
                                          LazyValue, LazyVariable)
from formulae.token import Token
from pandas.api.types import is_numeric_dtype
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.exceptions import NotFittedError
from sklearn.utils.validation import check_is_fitted

from .core.em import canonical

__all__ = ["RandomTerm", "FormulaSpec", "parse_formula", "FeatureEncoder", "FactorDesign",
           "DesignMatrices", "ModelDesign", "NUMPY_FUNCTIONS"]

logger = logging.getLogger(__name__)

#: Stands in for ``.`` until the data's columns are known. A backtick ends a quoted name in
#: formula text, so no column written in a formula can have this name.
_EVERY_OTHER_COLUMN = "`.`"

#: How many available columns an unknown-column error lists.
_COLUMNS_SHOWN = 10

#: numpy functions a formula can call, by their name or as ``np.name`` / ``numpy.name``.
NUMPY_FUNCTIONS = ("log", "log2", "log10", "log1p", "exp", "expm1", "sqrt", "abs", "sign",
                   "floor", "ceil", "sin", "cos", "tan", "arcsin", "arccos", "arctan", "sinh",
                   "cosh", "tanh")
#: Calls that make their argument categorical; they are a whole term or slope.
_CATEGORICAL = ("C", "factor")
#: Stateful transforms: their location and scale are learned at fit.
_STATEFUL = ("scale", "center")
_FUNCTIONS = frozenset({"I", *_CATEGORICAL, *_STATEFUL, *NUMPY_FUNCTIONS,
                        *(f"{module}.{name}" for module in ("np", "numpy")
                          for name in NUMPY_FUNCTIONS)})

#: Operators of formulae's call expressions, by (symbol, number of operands).
_OPERATORS = {
    **{(LazyOperator.SYMBOLS[op.__name__], 2): op for op in CallResolver.BINARY_OPERATORS.values()},
    **{(LazyOperator.SYMBOLS[op.__name__], 1): op for op in CallResolver.UNARY_OPERATORS.values()},
}

_INTERCEPT = "(Intercept)"

#: A name formulae's scanner reads as one identifier (others need backticks).
_IDENTIFIER = re.compile(r"[^\W\d][\w.]*")

#: An expression of the data, as nested tuples (hashable, and JSON once tuples are lists):
#: ``("column", name)``, ``("value", number or string)``, ``("operator", symbol, operand, ...)``
#: or ``("call", function, argument)``.
Expr = tuple


# --------------------------------------------------------------------------- the parsed formula

@dataclass(frozen=True)
class RandomTerm:
    """One ``(... | factor)`` block of the random part, after lme4's expansion of ``/``, ``||``.

    Attributes
    ----------
    factor : tuple of str
        The grouping columns: ``("g",)``, or ``("a", "b")`` for the interaction ``a:b``.
    intercept : bool
        Whether the term has a random intercept.
    slopes : tuple of str
        The random slopes, as component names: columns, or functions of them (``"scale(t)"``);
        each one's expression is ``FormulaSpec.expression(name)``.
    """

    factor: tuple[str, ...]
    intercept: bool
    slopes: tuple[str, ...]


@dataclass(frozen=True)
class FormulaSpec:
    """A parsed formula: what every term reads, before any data is seen.

    Attributes
    ----------
    text : str
        The formula as written.
    response : str
        Column of the response y.
    fixed : tuple of tuple of str
        The fixed part's terms in R's order (by degree, then as written), each the names of its
        components: ``("x1",)``, ``("x1", "x2")`` for ``x1:x2``, ``("log(x)",)``. The intercept
        is not a term. ``.`` is expanded in data order.
    terms : tuple of RandomTerm
        The random terms in formula order, ``/`` and ``||`` expanded.
    expressions : tuple of (str, Expr)
        Every component of ``fixed`` and every slope: its name and the expression it evaluates.
    """

    text: str
    response: str
    fixed: tuple[tuple[str, ...], ...]
    terms: tuple[RandomTerm, ...]
    expressions: tuple[tuple[str, Expr], ...]

    def expression(self, name: str) -> Expr:
        """The expression of the component (fixed-part component or slope) called ``name``."""
        return dict(self.expressions)[name]

    @property
    def factor_names(self) -> tuple[str, ...]:
        """The grouping factors as lme4 prints them (``"g"``, ``"a:b"``), in order of first
        appearance."""
        return tuple(_factor_name(factor) for factor in self.factors)

    @property
    def factors(self) -> tuple[tuple[str, ...], ...]:
        """The grouping factors' columns, in the order of ``factor_names``."""
        return tuple(dict.fromkeys(term.factor for term in self.terms))

    @property
    def fixed_columns(self) -> tuple[str, ...]:
        """The data columns the fixed part reads, each once, in order of first appearance."""
        return self._columns_of(name for term in self.fixed for name in term)

    @property
    def slope_columns(self) -> tuple[str, ...]:
        """The data columns the random slopes read, each once."""
        return self._columns_of(name for term in self.terms for name in term.slopes)

    @property
    def columns(self) -> tuple[str, ...]:
        """Every column the model reads, each once: response, fixed part, slopes, factors."""
        return tuple(dict.fromkeys((self.response, *self.fixed_columns, *self.slope_columns,
                                    *(column for factor in self.factors for column in factor))))

    def _columns_of(self, names: Iterable[str]) -> tuple[str, ...]:
        expressions = dict(self.expressions)
        return tuple(dict.fromkeys(column for name in names
                                   for column in _columns(expressions[name])))

    def to_dict(self) -> dict:
        """The spec as plain lists and dicts, ready for ``json.dumps``."""
        return {"text": self.text, "response": self.response,
                "fixed": [list(term) for term in self.fixed],
                "terms": [{"factor": list(term.factor), "intercept": term.intercept,
                           "slopes": list(term.slopes)} for term in self.terms],
                "expressions": [[name, _nested(expression, list)]
                                for name, expression in self.expressions]}

    @classmethod
    def from_dict(cls, state: Mapping) -> FormulaSpec:
        """The spec ``to_dict`` described, possibly after a JSON round trip."""
        return cls(text=state["text"], response=state["response"],
                   fixed=tuple(tuple(term) for term in state["fixed"]),
                   terms=tuple(RandomTerm(factor=tuple(term["factor"]),
                                          intercept=bool(term["intercept"]),
                                          slopes=tuple(term["slopes"]))
                               for term in state["terms"]),
                   expressions=tuple((name, _nested(expression, tuple))
                                     for name, expression in state["expressions"]))


def _factor_name(factor: tuple[str, ...]) -> str:
    return ":".join(factor)


def _nested(value, kind: type):
    """``value`` with every list and tuple in it turned into ``kind``: an :data:`Expr` as JSON
    lists, and back."""
    if isinstance(value, (list, tuple)):
        return kind(_nested(each, kind) for each in value)
    return value


def parse_formula(text: str, *, columns: Sequence[str] | None = None) -> FormulaSpec:
    """Read an lme4-style formula such as ``"y ~ x1 * x2 + (1 + t | g) + (1 | h)"``.

    Parameters
    ----------
    text : str
        ``response ~ fixed part + (random part | factor) + ...``, as described in the module's
        documentation. Names that are not identifiers can be quoted with backticks, as in
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
        Naming the formula, when it does not parse, names unknown columns or functions, has no
        random term, repeats a random term (or a column of one), or uses a construct lme4 reads
        otherwise than this module could (interactions in random slopes, ``*`` in a grouping
        factor).

    Notes
    -----
    A number other than 0 or 1 is not a term (``y ~ x + 2``), and the response must be a column.
    """
    if not isinstance(text, str):
        raise TypeError(f"formula must be a string, got {type(text).__name__}")
    tokens = _join_double_bars(_scan(text))
    # '.' excludes the response and the grouping columns, which only parsing reveals: parse
    # once with a placeholder for '.', then again with the columns it stands for
    spec = _spec_from_tokens(text, _substitute_period(tokens, [_EVERY_OTHER_COLUMN]))
    grouping = {column for factor in spec.factors for column in factor}
    if _EVERY_OTHER_COLUMN in {spec.response, *spec.slope_columns, *grouping}:
        raise _invalid(text, "'.' can only stand for features, on the right of '~' and outside "
                             "the random terms")
    if _EVERY_OTHER_COLUMN in spec.fixed_columns:
        if columns is None:
            raise _invalid(text, "'.' means every column except the response and the grouping "
                                 "columns: pass columns= to expand it")
        others = [name for name in columns if name != spec.response and name not in grouping]
        if not others:
            raise _invalid(text, "'.' expands to no column: the data has only the response and "
                                 "the grouping columns")
        spec = _spec_from_tokens(text, _substitute_period(tokens, others))
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


def _join_double_bars(tokens: list[Token]) -> list[Token]:
    """``tokens`` with every two consecutive ``|`` as one ``PIPE`` token spelt ``||``."""
    joined = []
    for token in tokens:
        if token.kind == "PIPE" and joined and joined[-1].kind == "PIPE" \
                and joined[-1].lexeme == "|":
            joined[-1] = Token("PIPE", "||")
        else:
            joined.append(token)
    return joined


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


def _parse(text: str, tokens: list[Token]):
    parser = Parser(tokens)
    try:
        tree = parser.parse()
    except ParseError as error:
        reason = "unexpected end of formula" if parser.peek().kind == "EOF" else str(error)
        raise _invalid(text, reason) from None
    if not parser.at_end():
        raise _invalid(text, f"unexpected {parser.peek().lexeme!r}")
    return tree


def _resolve(text: str, tree):
    """formulae's terms of a syntax tree, its errors as ours."""
    try:
        return Resolver(tree).resolve()
    except (ResolverError, CallResolverError, ValueError) as error:
        raise _invalid(text, str(error)) from None
    except TypeError as error:
        # formulae's term algebra raises TypeError on terms it cannot combine, as in 'x + 0'
        raise _invalid(text, f"these terms cannot be combined ({error})") from None


def _spec_from_tokens(text: str, tokens: list[Token]) -> FormulaSpec:
    tree = _parse(text, tokens)
    if not (isinstance(tree, syntax.Binary) and tree.operator.kind == "TILDE"):
        raise _invalid(text, "write 'response ~ features + (1 | group)'")
    fixed, random = [], []
    for sign, node in _summands(tree.right):
        bar = _random_bar(node)
        if bar is None and _has_bar(node):
            raise _invalid(text, f"{_text(node)!r}: a random term is added to the formula as a "
                                 "whole, as in 'y ~ x + (1 | g)', not combined with other terms")
        if bar is None:
            fixed.append((sign, node))
        elif sign is not None and sign.kind == "MINUS":
            raise _invalid(text, f"a random term cannot be removed: '- {_text(node)}'")
        else:
            random.append(bar)
    # the scanner starts the right-hand side with an implicit '1 +', so 'fixed' is never empty
    model = _resolve(text, syntax.Binary(tree.left, tree.operator, _sum(fixed)))
    response = _plain_column(model.response.term)
    if response is None:
        raise _invalid(text, f"the response {model.response.term.name!r} must be a column: add "
                             "a transformed column to the data instead")
    if not random:
        raise _invalid(text, "no random-effects term: add one such as (1 | group)")
    expressions: dict[str, Expr] = {}
    fixed_terms = [tuple(_component(text, component, expressions) for component in term.components)
                   for term in model.common_terms if isinstance(term, Term)]
    terms = tuple(term for node in random for term in _random_terms(text, node, expressions))
    _check_random_terms(text, terms)
    spec = FormulaSpec(text=text, response=response,
                       fixed=tuple(sorted(fixed_terms, key=len)),  # R orders terms by degree
                       terms=terms, expressions=tuple(expressions.items()))
    if response in {*spec.fixed_columns, *spec.slope_columns, *itertools.chain(*spec.factors)}:
        raise _invalid(text, f"the response {response!r} is also used on the right of '~'")
    return spec


def _summands(node) -> list[tuple[Token | None, object]]:
    """The terms of a sum as ``[(sign token, node), ...]``; the first has no sign."""
    if isinstance(node, syntax.Binary) and node.operator.kind in ("PLUS", "MINUS"):
        # the parser builds sums left-associated: the right operand is never a sum
        return [*_summands(node.left), (node.operator, node.right)]
    return [(None, node)]


def _has_bar(node) -> bool:
    """Whether a syntax tree has a ``|`` anywhere."""
    if isinstance(node, syntax.Binary):
        return node.operator.kind == "PIPE" or _has_bar(node.left) or _has_bar(node.right)
    if isinstance(node, syntax.Grouping):
        return _has_bar(node.expression)
    if isinstance(node, syntax.Unary):
        return _has_bar(node.right)
    if isinstance(node, syntax.Call):
        return any(map(_has_bar, node.args))
    return False


def _sum(summands: list[tuple[Token | None, object]]):
    """The syntax tree of ``summands`` (inverse of :func:`_summands`)."""
    (_, tree), *rest = summands
    for sign, node in rest:
        tree = syntax.Binary(tree, sign, node)
    return tree


def _random_bar(node):
    """The ``lhs | factor`` of a random term ``(lhs | factor)`` (in any number of parentheses),
    or None when ``node`` is not one."""
    if not isinstance(node, syntax.Grouping):
        return None
    while isinstance(node, syntax.Grouping):
        node = node.expression
    if isinstance(node, syntax.Binary) and node.operator.kind == "PIPE":
        return node
    return None


def _text(node) -> str:
    """Formula text of a syntax tree, for error messages."""
    if isinstance(node, syntax.Grouping):
        return f"({_text(node.expression)})"
    if isinstance(node, syntax.Binary):
        return f"{_text(node.left)} {node.operator.lexeme} {_text(node.right)}"
    if isinstance(node, syntax.Unary):
        return f"{node.operator.lexeme}{_text(node.right)}"
    if isinstance(node, syntax.Call):
        return f"{_text(node.callee)}({', '.join(map(_text, node.args))})"
    if isinstance(node, syntax.Variable):
        return node.name.lexeme + ("" if node.level is None else f"[{node.level.value}]")
    if isinstance(node, syntax.QuotedName):
        return node.expression.lexeme
    if isinstance(node, syntax.Assign):
        return f"{_text(node.name)}={_text(node.value)}"
    return str(node.lexeme if getattr(node, "lexeme", None) is not None else node.value)


def _random_terms(text: str, bar, expressions: dict[str, Expr]) -> list[RandomTerm]:
    """The random terms of one ``(lhs | factor)`` or ``(lhs || factor)``, as lme4 expands
    them: ``||`` into one term per column (``expandDoubleVerts``), then ``/`` into one term per
    factor (``expandSlash``)."""
    written = f"({_text(bar)})"
    if isinstance(bar.left, syntax.Binary) and bar.left.operator.kind == "PIPE":
        raise _invalid(text, f"{written}: a random term has one '|' (or '||') between its "
                             "columns and its grouping factor")
    intercept, slopes = _random_columns(text, bar.left, expressions, written=written)
    if not intercept and not slopes:
        raise _invalid(text, f"{written} has neither an intercept nor a slope")
    factors = _grouping_factors(text, bar.right)
    if bar.operator.lexeme == "||":
        pieces = [(True, ())] * intercept + [(False, (slope,)) for slope in slopes]
    else:
        pieces = [(intercept, tuple(slopes))]
    return [RandomTerm(factor=factor, intercept=has_intercept, slopes=piece_slopes)
            for has_intercept, piece_slopes in pieces for factor in factors]


def _random_columns(text: str, node, expressions: dict[str, Expr], *,
                    written: str) -> tuple[bool, list[str]]:
    """Whether the left side of a random term has an intercept (lme4: unless ``0`` or ``-1``,
    the last one written counting), and its slopes' names."""
    intercept, slopes = True, []
    for sign, summand in _summands(node):
        positive = sign is None or sign.kind == "PLUS"
        while isinstance(summand, syntax.Unary):
            positive ^= summand.operator.kind == "MINUS"
            summand = summand.right
        if isinstance(summand, syntax.Literal) and summand.value in (0, 1) \
                and not isinstance(summand.value, bool):
            intercept = (summand.value == 1) == positive
            continue
        if not positive:
            raise _invalid(text, f"{written}: only the intercept can be removed from a random "
                                 f"term, not {_text(summand)!r}")
        resolved = _resolve(text, summand)
        if not isinstance(resolved, (Term, Model)) or getattr(resolved, "group_terms", None):
            raise _invalid(text, f"{written}: {_text(summand)!r} cannot be a random slope")
        terms = [resolved] if isinstance(resolved, Term) else [
            term for term in resolved.common_terms if isinstance(term, Term)]
        for term in terms:
            if len(term.components) > 1:
                raise _invalid(text, f"random slope {term.name!r} must be a column or a function "
                                     "of columns: interactions are not supported in random terms")
            name = _component(text, term.components[0], expressions)
            if name not in slopes:
                slopes.append(name)
    return intercept, slopes


def _grouping_factors(text: str, node) -> list[tuple[str, ...]]:
    """The grouping factors of a random term's right side: columns, ``a:b`` (interaction) and
    ``a/b`` (nesting, ``a`` and ``a:b``), each factor as its columns."""
    if isinstance(node, syntax.Grouping):
        return _grouping_factors(text, node.expression)
    if isinstance(node, syntax.Variable) and node.level is None:
        return [(node.name.lexeme,)]
    if isinstance(node, syntax.QuotedName):
        return [(node.expression.lexeme[1:-1],)]
    if isinstance(node, syntax.Binary) and node.operator.kind in ("COLON", "SLASH"):
        left, right = _grouping_factors(text, node.left), _grouping_factors(text, node.right)
        if node.operator.kind == "COLON":
            combined = [_merged(outer, inner) for outer in left for inner in right]
        else:  # R's a/b: a, then b within every column of the left side
            combined = left + [_merged(*left, inner) for inner in right]
        return list(dict.fromkeys(combined))
    raise _invalid(text, f"the grouping factor {_text(node)!r} must be a column, or columns "
                         "joined by ':' (their interaction) or '/' (nested factors)")


def _merged(*factors: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(column for factor in factors for column in factor))


def _check_random_terms(text: str, terms: tuple[RandomTerm, ...]) -> None:
    """Refuse a column of a factor in two terms (a repeated term) and two factors that lme4
    would print with the same name."""
    seen, names = set(), {}
    for term in terms:
        name = _factor_name(term.factor)
        if names.setdefault(name, term.factor) != term.factor:
            raise _invalid(text, f"two grouping factors are called {name!r}: rename the column "
                                 "whose name has a ':'")
        for piece in (_INTERCEPT,) * term.intercept + term.slopes:
            if (term.factor, piece) in seen:
                what = "intercept" if piece == _INTERCEPT else f"slope {piece!r}"
                raise _invalid(text, f"a random term is repeated: the {what} of grouping factor "
                                     f"{name!r} is in more than one term")
            seen.add((term.factor, piece))


def _component(text: str, component, expressions: dict[str, Expr]) -> str:
    """The name of one component of a term (a column or a call), recorded in ``expressions``."""
    if isinstance(component, Call):
        expression = _expression(text, component.call, outermost=True)
        name = _render(expression)
    elif isinstance(component, Variable) and isinstance(component.name, str):
        if component.reference is not None:
            raise _invalid(text, f"'{component.name}[{component.reference}]' selects a level, "
                                 "which only a response can do")
        name, expression = component.name, ("column", component.name)
    else:  # formulae turns a number such as the '2' in 'x + 2' into a Variable named 2
        raise _invalid(text, f"the term {component.name!r} is a number, not a column or a "
                             "function of columns")
    if expressions.setdefault(name, expression) != expression:
        raise _invalid(text, f"{name!r} is both a column and a function call: rename the column")
    return name


def _expression(text: str, lazy, *, outermost: bool) -> Expr:
    """Our :data:`Expr` of formulae's lazy call objects, with its functions checked."""
    if isinstance(lazy, LazyVariable):
        return ("column", lazy.name)
    if isinstance(lazy, LazyValue):
        return ("value", lazy.value)
    if isinstance(lazy, LazyOperator):
        return ("operator", lazy.symbol,
                *(_expression(text, operand, outermost=False) for operand in lazy.args))
    assert isinstance(lazy, LazyCall), lazy
    if lazy.callee not in _FUNCTIONS:
        known = ", ".join(["I", *_CATEGORICAL, *_STATEFUL, *NUMPY_FUNCTIONS])
        raise _invalid(text, f"unknown function {lazy.callee!r} in '{lazy}'; a formula can call "
                             f"{known} (also as np.log)")
    if lazy.kwargs or len(lazy.args) != 1:
        raise _invalid(text, f"'{lazy}': {lazy.callee}() takes one argument")
    if lazy.callee in _CATEGORICAL and not outermost:
        raise _invalid(text, f"'{lazy}' must be a whole term or slope, as in 'C(x)' or 'C(x):t'")
    return ("call", lazy.callee, _expression(text, lazy.args[0], outermost=False))


def _plain_column(term) -> str | None:
    """The column a term reads when it is a bare column name, else None."""
    if isinstance(term, Term) and len(term.components) == 1:
        (component,) = term.components
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


# -------------------------------------------------------------------------------- expressions

def _render(expression: Expr, *, operand: bool = False) -> str:
    """The text of an expression: its name in the design (``log(x)``, ``I((x + 1) ** 2)``), and
    the key of a stateful transform's learned state. Operands that are operations are
    parenthesised, so different expressions never share a text."""
    kind = expression[0]
    if kind == "column":
        name = expression[1]
        return name if _IDENTIFIER.fullmatch(name) else f"`{name}`"
    if kind == "value":
        return repr(expression[1]) if isinstance(expression[1], str) else str(expression[1])
    if kind == "call":
        return f"{expression[1]}({_render(expression[2])})"
    symbol, operands = expression[1], expression[2:]
    text = (f"{symbol}{_render(operands[0], operand=True)}" if len(operands) == 1 else
            f" {symbol} ".join(_render(each, operand=True) for each in operands))
    return f"({text})" if operand else text


def _columns(expression: Expr) -> Iterator[str]:
    """The data columns an expression reads."""
    if expression[0] == "column":
        yield expression[1]
    elif expression[0] in ("operator", "call"):
        for operand in expression[2:]:
            yield from _columns(operand)


def _stateful_calls(expression: Expr) -> Iterator[Expr]:
    """The ``scale`` and ``center`` calls of an expression, inner ones first."""
    if expression[0] in ("operator", "call"):
        for operand in expression[2:]:
            yield from _stateful_calls(operand)
        if expression[0] == "call" and expression[1] in _STATEFUL:
            yield expression


def _evaluate(expression: Expr, frame, stateful: Mapping[str, tuple[float, float]]):
    """The values of an expression on a pandas frame (a Series, or a scalar for a constant), or
    lazily on a Dask DataFrame (a Dask Series).

    ``stateful`` holds the (location, scale) of every ``scale`` / ``center`` call it contains.
    """
    kind = expression[0]
    if kind == "column":
        return frame[expression[1]]
    if kind == "value":
        return expression[1]
    if kind == "operator":
        operands = expression[2:]
        return _OPERATORS[expression[1], len(operands)](
            *(_evaluate(each, frame, stateful) for each in operands))
    function, argument = expression[1], _evaluate(expression[2], frame, stateful)
    if function in ("I", *_CATEGORICAL):
        return argument
    if function in _STATEFUL:
        location, scale = stateful[_render(expression)]
        return (argument - location) / scale
    return getattr(np, function.rpartition(".")[2])(argument)


def _as_float(values, *, n: int, what: str) -> np.ndarray:
    """An evaluated numeric expression as float64 of shape (n,), missing values as NaN."""
    if not isinstance(values, pd.Series):
        try:  # a constant, as in I(2)
            return np.full(n, float(values))
        except (TypeError, ValueError):
            raise ValueError(f"{what} is the constant {values!r}; it must be numeric") from None
    if not is_numeric_dtype(values.dtype):
        raise ValueError(f"{what} holds {values.dtype} values; it must be numeric")
    return values.to_numpy(dtype=np.float64, na_value=np.nan)


def _distinct(values):
    """The distinct values of a pandas or Dask Series, missing values left out (lazy on Dask)."""
    return values.dropna().drop_duplicates()


#: The columns of :func:`_partition_moments`.
_MOMENTS = pd.DataFrame({"n": pd.Series(dtype="int64"), "mean": pd.Series(dtype="float64"),
                         "m2": pd.Series(dtype="float64")})


def _partition_moments(values: pd.Series, *, what: str) -> pd.DataFrame:
    """One row: the number of values, their mean and their sum of squared deviations from it
    (missing values left out); rows of partitions combine exactly (:func:`_location_and_scale`),
    where sums of squares would lose the variance of values far from zero."""
    x = _as_float(values, n=len(values), what=what)
    x = x[~np.isnan(x)]
    mean = float(x.mean()) if len(x) else 0.0
    return pd.DataFrame({"n": [len(x)], "mean": [mean], "m2": [float(((x - mean) ** 2).sum())]})


def _moments(values, *, what: str):
    """:func:`_partition_moments` of a pandas Series, or lazily of every partition of a Dask
    Series."""
    if isinstance(values, pd.Series):
        return _partition_moments(values, what=what)
    if hasattr(values, "map_partitions"):
        return values.map_partitions(_partition_moments, what=what, meta=_MOMENTS)
    raise ValueError(f"{what} is the constant {values!r}: it has no mean or standard deviation")


def _location_and_scale(call: Expr, moments: pd.DataFrame) -> tuple[float, float]:
    """The mean and, for ``scale``, the standard deviation (n - 1, as R's ``sd``) of all rows,
    from the moments of every partition (Chan et al.'s pairwise formula)."""
    n, means, m2 = (moments[column].to_numpy(dtype=np.float64) for column in ("n", "mean", "m2"))
    total = n.sum()
    if not total:
        raise ValueError(f"{_render(call)}: {_render(call[2])} has no values")
    # rounded far below any meaning: partial moments add in an order that depends on the
    # partitioning, and the same data must give the same design bits (canonical's reason)
    mean = canonical(float(n @ means / total))
    if call[1] == "center":
        return mean, 1.0
    sd = canonical(math.sqrt((m2.sum() + n @ (means - mean) ** 2) / (total - 1))
                   if total > 1 else 0.0)
    if not sd > 0:
        raise ValueError(f"{_render(call)}: {_render(call[2])} has no variance, so it cannot "
                         "be scaled")
    return mean, sd


def _learn_stateful(frame, expressions: Iterable[Expr]) -> dict[str, tuple[float, float]]:
    """The (location, scale) of every ``scale`` / ``center`` call in ``expressions``, learned
    from every row of ``frame`` (pandas, or Dask without gathering rows): one pass over the data
    per level of nesting (``scale(log(center(x)))`` needs two)."""
    calls = list(dict.fromkeys(call for expression in expressions
                               for call in _stateful_calls(expression)))
    learned: dict[str, tuple[float, float]] = {}
    while len(learned) < len(calls):
        ready = [call for call in calls if _render(call) not in learned
                 and all(_render(inner) in learned for inner in _stateful_calls(call[2]))]
        moments = dask.compute(*(_moments(_evaluate(call[2], frame, learned),
                                          what=f"the argument of {_render(call)}")
                                 for call in ready))
        learned.update({_render(call): _location_and_scale(call, moment)
                        for call, moment in zip(ready, moments)})
    return learned


# ------------------------------------------------------------------------- the tree encoding

def _check_codable(name: str, dtype) -> None:
    """Refuse a column of dates, times or periods, naming it."""
    if dtype.kind in "mM" or isinstance(dtype, pd.PeriodDtype):
        raise ValueError(f"column {name!r} holds {dtype} values: convert it to numbers first "
                         "(for example seconds since a reference time)")


class FeatureEncoder(TransformerMixin, BaseEstimator):
    """Encode feature columns as a float64 matrix, the same way at fit and at predict time.

    Numeric and boolean columns become floats; their missing values stay NaN. String, object
    and categorical columns become integer codes: the value's position among the categories
    seen at fit, sorted. Values not seen at fit and missing values become -1, one extra
    category below all others.

    Every column of the frame given to ``fit`` is a feature, so select the features first
    (``frame[list(spec.fixed_columns)]``, lazy on Dask). ``fit`` accepts a Dask DataFrame and
    computes only the distinct values of the non-numeric columns; ``transform`` works on one
    pandas frame (a partition).

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
            _check_codable(name, dtype)
        categorical = [name for name, dtype in frame.dtypes.items() if not is_numeric_dtype(dtype)]
        # one dask.compute reads the data once for all columns; pandas objects pass through as is
        distinct = dask.compute(*(_distinct(frame[name]) for name in categorical))
        return self._set_fitted(frame.columns, {
            name: _sorted_categories(values, what=f"feature column {name!r}")
            for name, values in zip(categorical, distinct)})

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
        _require_pandas(frame, "FeatureEncoder.transform")
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


def _require_pandas(frame, where: str) -> None:
    if not isinstance(frame, pd.DataFrame):
        raise TypeError(f"{where} takes one pandas DataFrame, got {type(frame).__name__}; "
                        "for a Dask DataFrame, call it on each partition")


def _sorted_categories(values: pd.Series, *, what: str) -> list:
    """The distinct values of a column as sorted, JSON-serialisable Python scalars."""
    categories = values.tolist()
    unsupported = sorted({type(value).__name__ for value in categories
                          if not isinstance(value, (str, int, float))})
    if unsupported:
        raise ValueError(f"{what} holds {', '.join(unsupported)} values: convert it to numbers "
                         "or strings first")
    try:
        return sorted(categories)
    except TypeError:
        kinds = ", ".join(sorted({type(value).__name__ for value in categories}))
        raise ValueError(f"{what} mixes {kinds} values: convert it to one type first") from None


# ------------------------------------------------------------------------------------ designs

@dataclass(frozen=True)
class FactorDesign:
    """The random-effects design of one grouping factor.

    Attributes
    ----------
    name : str
        As lme4 prints it: ``"g"``, or ``"a:b"`` for an interaction.
    columns : tuple of str
        Its grouping columns.
    z_names : tuple of str
        lme4's names of its Z columns: ``"(Intercept)"``, slopes (``"t"``, ``"scale(t)"``),
        levels of a categorical slope (``"fb"``), term after term.
    blocks : tuple of tuple of int
        Indices into ``z_names``, one tuple per random term of this factor: the terms of one
        factor are uncorrelated blocks of its covariance D.
    """

    name: str
    columns: tuple[str, ...]
    z_names: tuple[str, ...]
    blocks: tuple[tuple[int, ...], ...]


class DesignMatrices(NamedTuple):
    """The arrays one frame contributes to the model (n_samples rows each).

    Attributes
    ----------
    X : ndarray of shape (n_samples, len(ModelDesign.x_names)), dtype float64
        The fixed-effects learner's input.
    y : ndarray of shape (n_samples,), dtype float64, or None
        The response; None when the frame has no response column and none was required.
    groups : list of ndarray of shape (n_samples,)
        One per factor of ``ModelDesign.factors``: the level of every row. A one-column factor's
        values as they are; an interaction's labels ``"a1:b1"`` (strings, as lme4 prints them).
    Z : list of ndarray of shape (n_samples, len(factor.z_names)), dtype float64
        One per factor of ``ModelDesign.factors``: its random-effect covariates.
    """

    X: np.ndarray
    y: np.ndarray | None
    groups: list[np.ndarray]
    Z: list[np.ndarray]


#: A design column: the product of (component, level) pairs, where the level is the index of a
#: categorical component's level (an indicator) or None for a numeric component (its values).
#: The empty product is the intercept.
_Column = tuple[tuple[str, int | None], ...]


class ModelDesign:
    """What a formula's arrays need from the data, learned once, and those arrays per frame.

    ``fit`` learns, from every row of a pandas or Dask DataFrame (Dask reductions, nothing
    gathered): the levels of the categorical components, the mean and standard deviation of
    every ``scale`` / ``center`` call, and the tree encoding's categories; it also checks the
    grouping factors. ``transform`` then builds the arrays of any pandas frame (a partition),
    at fit or at predict time, the same way.

    Parameters
    ----------
    spec : FormulaSpec

    Attributes
    ----------
    spec : FormulaSpec
    full_design : bool
        Set by ``fit``: X is the fixed part's full design (linear learners) rather than the
        columns it reads (tree learners).
    x_names : list of str
        Names of X's columns: the fixed part's columns (tree design), or lme4's names of the
        full design's columns (``"x1"``, ``"x1:x2"``, ``"fb"``, ``"C(k)2"``, ``"log(x)"``).
    factors : list of FactorDesign
        One per grouping factor, in the order of ``spec.factor_names``.
    levels : dict of str to list
        The sorted levels of every categorical component the design codes, and the categories
        of the tree design's non-numeric columns.
    stateful : dict of str to (float, float)
        The (mean, standard deviation) of every ``scale`` call and (mean, 1) of every
        ``center`` call, by its text.
    """

    def __init__(self, spec: FormulaSpec):
        self.spec = spec

    def fit(self, frame, *, full_design: bool) -> ModelDesign:
        """Learn what the design needs from every row of ``frame``.

        Parameters
        ----------
        frame : pandas.DataFrame or dask.dataframe.DataFrame
            Has every column of ``spec.columns``.
        full_design : bool
            Give X the fixed part's full design (for linear learners, so the fixed part is
            lmer's) instead of the columns it reads (for tree learners).

        Returns
        -------
        ModelDesign
            ``self``.

        Raises
        ------
        ValueError
            Naming the column or the term: a column is missing or holds dates, a grouping
            column has missing values, a grouping factor has as many levels as rows, a
            categorical component has fewer than two levels or mixes types, a ``scale``
            argument is constant, or two design columns get the same name.
        """
        spec = self.spec
        _require_columns(spec.columns, list(frame.columns), context=f"formula {spec.text!r}")
        dtypes = frame.dtypes
        for column in (*spec.fixed_columns, *spec.slope_columns):
            _check_codable(column, dtypes[column])
        # only the columns the formula reads travel through the graphs below
        frame = frame[list(spec.columns)]
        used = self._components(full_design=full_design)
        stateful = _learn_stateful(frame, (spec.expression(name) for name in used))
        coded = {name: spec.expression(name) for name in used
                 if _is_categorical(spec.expression(name), dtypes)}
        encoded = {} if full_design else {
            column: ("column", column) for column in spec.fixed_columns
            if not is_numeric_dtype(dtypes[column])}
        # one pass over the data for everything else
        distinct, missing, n_levels, n_rows = dask.compute(
            {name: _distinct(_evaluate(expression, frame, stateful))
             for name, expression in {**encoded, **coded}.items()},
            {column: frame[column].isna().sum() for factor in spec.factors for column in factor},
            {_factor_name(factor): frame[list(factor)].drop_duplicates().shape[0]
             for factor in spec.factors},
            frame.shape[0])
        for column, count in missing.items():
            if count:
                raise _missing_ids(column, int(count))
        if not n_rows:
            raise ValueError(f"formula {spec.text!r}: the data has no rows")
        for name, count in n_levels.items():
            if count >= n_rows:
                raise ValueError(f"grouping factor {name!r} has as many levels as the data has "
                                 f"rows ({n_rows}): a random effect per row cannot be told "
                                 "apart from the residual")
        levels = {name: _sorted_categories(values, what=_role(spec, name))
                  for name, values in distinct.items()}
        for name in coded:
            if len(levels[name]) < 2:
                raise ValueError(f"{_role(spec, name)} is categorical with "
                                 f"{len(levels[name])} level(s) {levels[name]} at fit: coding "
                                 "it needs two or more")
        self._set_fitted(full_design=full_design, levels=levels, stateful=stateful)
        if not full_design and any(len(term) > 1 or spec.expression(term[0])[0] != "column"
                                   for term in spec.fixed):
            logger.info("formula %r: the tree learner gets the fixed part's columns %s as they "
                        "are; trees find interactions and transformations themselves",
                        spec.text, ", ".join(spec.fixed_columns))
        return self

    def transform(self, frame: pd.DataFrame, *, require_response: bool = True) -> DesignMatrices:
        """The arrays of one pandas frame (a partition).

        Parameters
        ----------
        frame : pandas.DataFrame of shape (n_samples, n_columns)
        require_response : bool, default=True
            Whether the response column must be present and complete (True to fit; False to
            predict, when y is returned only if the frame has it).

        Returns
        -------
        DesignMatrices
            ``(X, y, groups, Z)``. Levels not seen at fit (and missing values) of a categorical
            component give zeros in its indicator columns (code -1 in the tree design).

        Raises
        ------
        ValueError
            Naming the column, when a column is missing, a grouping column or a random slope has
            missing values, a numeric component is not numeric any more, or a required response
            is not numeric or has missing values.
        """
        self._check_fitted()
        _require_pandas(frame, "ModelDesign.transform")
        spec = self.spec
        required = [name for name in spec.columns if require_response or name != spec.response]
        _require_columns(required, frame.columns, context=f"formula {spec.text!r}")
        y = None
        if spec.response in frame.columns:
            y = _numeric_column(frame, spec.response, role="response", complete=require_response)
        groups = [_group_labels(frame, factor.columns) for factor in self.factors]
        slopes = {name for term in spec.terms for name in term.slopes}
        values = {name: self._component_values(frame, name, complete=name in slopes)
                  for name in self._components(full_design=self.full_design)}
        X = (_design_matrix(self._x_columns, values, len(frame)) if self.full_design
             else self._encoder.transform(frame))
        Z = [_design_matrix(columns, values, len(frame)) for columns in self._z_columns]
        return DesignMatrices(X=X, y=y, groups=groups, Z=Z)

    def to_dict(self) -> dict:
        """The fitted design as plain lists and dicts, ready for ``json.dumps``.

        Returns
        -------
        dict
            ``{"spec": FormulaSpec.to_dict(), "full_design": bool, "levels": {...},
            "stateful": {...}}``.
        """
        self._check_fitted()
        return {"spec": self.spec.to_dict(), "full_design": self.full_design,
                "levels": {name: list(values) for name, values in self.levels.items()},
                "stateful": {name: list(pair) for name, pair in self.stateful.items()}}

    @classmethod
    def from_dict(cls, state: Mapping) -> ModelDesign:
        """A fitted design from the output of ``to_dict``, possibly after a JSON round trip.

        Parameters
        ----------
        state : mapping

        Returns
        -------
        ModelDesign
        """
        return cls(FormulaSpec.from_dict(state["spec"]))._set_fitted(
            full_design=bool(state["full_design"]), levels=state["levels"],
            stateful={name: tuple(pair) for name, pair in state["stateful"].items()})

    def _components(self, *, full_design: bool) -> list[str]:
        """The components whose values the design computes: the slopes, and the fixed part's
        components for the full design."""
        spec = self.spec
        fixed = [name for term in spec.fixed for name in term] if full_design else []
        return list(dict.fromkeys([*fixed, *(name for term in spec.terms for name in term.slopes)]))

    def _set_fitted(self, *, full_design: bool, levels: Mapping[str, list],
                    stateful: Mapping[str, tuple[float, float]]) -> ModelDesign:
        """Set the learned state and lay out the design's columns from it."""
        spec = self.spec
        self.full_design = full_design
        self.levels = {name: list(values) for name, values in levels.items()}
        self.stateful = dict(stateful)
        if full_design:
            # every learner fits its own intercept, so the fixed part is coded as R codes a
            # model with one, without its column
            self._x_columns = _coded_columns(spec.fixed, intercept=True, levels=self.levels)
            self.x_names = self._names(self._x_columns, role="fixed-effects design")
        else:
            self._encoder = FeatureEncoder.from_dict({
                "feature_names_in": list(spec.fixed_columns),
                "categories": {column: self.levels[column] for column in spec.fixed_columns
                               if column in self.levels}})
            self.x_names = list(spec.fixed_columns)
        self.factors, self._z_columns = [], []
        for factor in spec.factors:
            columns, blocks = [], []
            for term in spec.terms:
                if term.factor == factor:
                    start = len(columns)
                    columns += [()] * term.intercept + _coded_columns(
                        [(slope,) for slope in term.slopes], intercept=term.intercept,
                        levels=self.levels)
                    blocks.append(tuple(range(start, len(columns))))
            name = _factor_name(factor)
            self.factors.append(FactorDesign(
                name=name, columns=factor, blocks=tuple(blocks),
                z_names=tuple(self._names(columns, role=f"random effects of {name!r}"))))
            self._z_columns.append(columns)
        return self

    def _names(self, columns: list[_Column], *, role: str) -> list[str]:
        names = [":".join(name if level is None else f"{name}{self.levels[name][level]}"
                          for name, level in column) or _INTERCEPT for column in columns]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"formula {self.spec.text!r}: the {role} has several columns "
                             f"named {', '.join(map(repr, repeated))}: rename a column")
        return names

    def _component_values(self, frame: pd.DataFrame, name: str, *, complete: bool) -> np.ndarray:
        """A component's values on ``frame``: float64 for a numeric one, level codes (-1 for a
        level not seen at fit) for a categorical one. ``complete`` refuses missing values."""
        what = _role(self.spec, name)
        try:
            values = _evaluate(self.spec.expression(name), frame, self.stateful)
        except (TypeError, ValueError) as error:  # numpy's or pandas' own, as in log of strings
            raise ValueError(f"{what} cannot be computed from the data: {error}") from error
        if name in self.levels:
            values = pd.Series(values, index=frame.index) if np.ndim(values) == 0 else values
            missing = int(values.isna().sum()) if complete else 0
            codes = pd.Index(self.levels[name]).get_indexer(values)
        else:
            codes = _as_float(values, n=len(frame), what=what)
            missing = int(np.isnan(codes).sum()) if complete else 0
        if missing:
            raise ValueError(f"{what} has {missing} missing values; drop or fill those rows "
                             "first")
        return codes

    def _check_fitted(self) -> None:
        if not hasattr(self, "x_names"):
            raise NotFittedError("this ModelDesign is not fitted yet: call fit(frame, "
                                 "full_design=...) first")


def _is_categorical(expression: Expr, dtypes) -> bool:
    """Whether a component is coded by levels: a ``C()`` / ``factor()`` call, or a column that
    is neither numeric nor boolean."""
    if expression[0] == "call":
        return expression[1] in _CATEGORICAL
    return expression[0] == "column" and not is_numeric_dtype(dtypes[expression[1]])


def _role(spec: FormulaSpec, name: str) -> str:
    """How error messages call a component (or a tree design's column)."""
    if any(name in term.slopes for term in spec.terms):
        return f"random slope {name!r}"
    return f"fixed-effects term {name!r}"


def _coded_columns(terms: Sequence[tuple[str, ...]], *, intercept: bool,
                   levels: Mapping[str, list]) -> list[_Column]:
    """The design columns of ``terms`` as R's ``model.matrix`` codes them.

    A categorical component of a term is coded by treatment contrasts (its levels but the
    first) when the term without it is in the model (the intercept for a main effect), and by
    indicators of all its levels otherwise; without an intercept, the first categorical
    component gets indicators of all its levels. Categorical components are the keys of
    ``levels``. A term's columns vary its first categorical component fastest, as R's do.
    """
    present = {frozenset(term) for term in terms}
    all_levels_first = not intercept
    columns: list[_Column] = []
    for term in terms:
        choices = []
        for name in term:
            if name not in levels:
                choices.append((None,))
                continue
            rest = frozenset(term) - {name}
            all_levels = all_levels_first or (bool(rest) and rest not in present)
            all_levels_first = False
            choices.append(range(0 if all_levels else 1, len(levels[name])))
        columns += [tuple(zip(term, reversed(combination)))
                    for combination in itertools.product(*reversed(choices))]
    return columns


def _design_matrix(columns: list[_Column], values: Mapping[str, np.ndarray], n: int) -> np.ndarray:
    """The (n, len(columns)) float64 matrix of design columns, from the components' values."""
    matrix = np.ones((n, len(columns)), dtype=np.float64)
    for position, column in enumerate(columns):
        for name, level in column:
            matrix[:, position] *= values[name] if level is None else values[name] == level
    return matrix


def _missing_ids(column: str, count: int) -> ValueError:
    return ValueError(f"grouping column {column!r} has {count} missing ids; drop or fill those "
                      "rows first")


def _group_labels(frame: pd.DataFrame, columns: tuple[str, ...]) -> np.ndarray:
    """Every row's level of a grouping factor: the column's values, or lme4's ``"a1:b1"``
    labels of an interaction."""
    for column in columns:
        missing = int(frame[column].isna().sum())
        if missing:
            raise _missing_ids(column, missing)
    if len(columns) == 1:
        return frame[columns[0]].to_numpy()
    labels = frame[columns[0]].astype(str)
    for column in columns[1:]:
        labels = labels + ":" + frame[column].astype(str)
    return labels.to_numpy(dtype=object)


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
