"""Formula parsing, feature encoding and model designs (merf_dask.formula)."""

import json
import logging
import pickle
import re

import dask.dataframe as dd
import numpy as np
import pandas as pd
import pytest
from formulae import design_matrices as formulae_design_matrices
from sklearn.exceptions import NotFittedError

from merf_dask.formula import (FeatureEncoder, FormulaSpec, ModelDesign, RandomTerm,
                               parse_formula)

COLUMNS = ["y", "x1", "x2", "t", "u", "g", "h", "a", "b", "my col"]


def invalid(text):
    """The start of every error message about formula ``text``."""
    return re.escape(f"invalid formula {text!r}: ")


def term(factor, intercept=True, slopes=()):
    return RandomTerm(factor=tuple(factor.split(":")), intercept=intercept, slopes=tuple(slopes))


@pytest.fixture
def frame():
    return pd.DataFrame({
        "y": [1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
        "x": [0.5, np.nan, 2.0, 3.0, 4.0, 5.0],
        "flag": [True, False, True, True, False, False],
        "city": ["oslo", "bern", None, "rome", "bern", "oslo"],
        "size": pd.Categorical(["s", "m", "s", "m", "l", None]),
        "t": [1, 2, 3, 4, 5, 6],
        "g": ["a", "a", "a", "b", "b", "b"],
    })


@pytest.fixture(scope="module")
def data():
    """Several rows per level of every grouping factor, numeric and categorical columns."""
    rng = np.random.default_rng(7)
    n = 60
    return pd.DataFrame({
        "y": rng.normal(size=n),
        "x1": rng.normal(size=n),
        "x2": rng.uniform(1.0, 3.0, size=n),
        "t": rng.normal(5.0, 2.0, size=n),
        "f": rng.choice(["c", "a", "b"], size=n),          # a string column: categorical
        "k": rng.choice([3, 1, 2], size=n),                # numbers, categorical only in C(k)
        "h": rng.choice(["u", "v"], size=n),
        "g": np.repeat([f"g{i}" for i in range(6)], 10),
        "school": np.repeat(["s1", "s2", "s3"], 20),
        "class": np.tile(np.repeat(["c1", "c2"], 10), 3),  # c1 in every school: nested by name
    })


# --- parse_formula: the random part ------------------------------------------------------------

@pytest.mark.parametrize("random_part, terms", [
    ("(1 | g)", [term("g")]),
    ("(1 + t | g)", [term("g", slopes=["t"])]),
    ("(t | g)", [term("g", slopes=["t"])]),
    ("(0 + t | g)", [term("g", False, ["t"])]),
    ("(-1 + t | g)", [term("g", False, ["t"])]),
    ("(t - 1 | g)", [term("g", False, ["t"])]),
    ("(1 + 0 + t | g)", [term("g", False, ["t"])]),  # formulae alone keeps the intercept
    ("(0 + 1 + t | g)", [term("g", slopes=["t"])]),  # the last one written counts, as in R
    ("(1 + t + u | g)", [term("g", slopes=["t", "u"])]),
    ("(1 | a) + (1 | b)", [term("a"), term("b")]),
    ("(1 | a:b)", [term("a:b")]),
    ("(1 | a/b)", [term("a"), term("a:b")]),
    ("(1 | g/a/b)", [term("g"), term("g:a"), term("g:a:b")]),
    ("(1 + t | a/b)", [term("a", slopes=["t"]), term("a:b", slopes=["t"])]),
    ("(1 + t | g) + (1 | h)", [term("g", slopes=["t"]), term("h")]),
    # lme4 reads these as two uncorrelated terms of g, not as (1 + t | g)
    ("(1 | g) + (0 + t | g)", [term("g"), term("g", False, ["t"])]),
    ("(t || g)", [term("g"), term("g", False, ["t"])]),
    ("(1 + t + u || g)", [term("g"), term("g", False, ["t"]), term("g", False, ["u"])]),
    ("(0 + t + u || g)", [term("g", False, ["t"]), term("g", False, ["u"])]),
    ("(1 + t || a/b)", [term("a"), term("a:b"), term("a", False, ["t"]),
                        term("a:b", False, ["t"])]),
    ("(1 + scale(t) | g)", [term("g", slopes=["scale(t)"])]),
    ("(1 + log(t) + I(u ** 2) | g)", [term("g", slopes=["log(t)", "I(u ** 2)"])]),
    ("((1 | g))", [term("g")]),
])
def test_random_terms_follow_lme4(random_part, terms):
    spec = parse_formula(f"y ~ x1 + {random_part}", columns=COLUMNS)
    assert spec.terms == tuple(terms)
    assert spec.factor_names == tuple(dict.fromkeys(":".join(t.factor) for t in terms))


def test_factor_names_and_columns_in_order_of_first_appearance():
    spec = parse_formula("y ~ x1 * x2 + log(u) + (1 + t | a/b) + (1 | h) + (0 + u | a)")
    assert spec.factor_names == ("a", "a:b", "h")
    assert spec.factors == (("a",), ("a", "b"), ("h",))
    assert spec.fixed_columns == ("x1", "x2", "u")
    assert spec.slope_columns == ("t", "u")
    assert spec.columns == ("y", "x1", "x2", "u", "t", "a", "b", "h")


@pytest.mark.parametrize("text, reason", [
    ("y ~ x1", "no random-effects term"),
    ("y ~ x1 + (1 | g) + (1 | g)", "a random term is repeated: the intercept of grouping "
                                   "factor 'g' is in more than one term"),
    ("y ~ x1 + (1 + t | g) + (0 + t | g)", "a random term is repeated: the slope 't' of "
                                           "grouping factor 'g'"),
    ("y ~ x1 + (1 | a/b) + (1 | a)", "a random term is repeated: the intercept of grouping "
                                     "factor 'a' is in more than one term"),
    ("y ~ x1 + (1 + t | g | h)", "(1 + t | g | h): a random term has one '|'"),
    ("y ~ x1 + (0 | g)", "(0 | g) has neither an intercept nor a slope"),
    ("y ~ x1 + (t:u | g)", "random slope 't:u' must be a column or a function of columns"),
    ("y ~ x1 + (t*u | g)", "random slope 't:u' must be a column"),
    ("y ~ x1 + (1 - t | g)", "(1 - t | g): only the intercept can be removed from a random "
                             "term, not 't'"),
    ("y ~ x1 + (1 | C(g))", "the grouping factor 'C(g)' must be a column, or columns joined "
                            "by ':' (their interaction) or '/' (nested factors)"),
    ("y ~ x1 + (1 | a*b)", "the grouping factor 'a * b' must be a column"),
    ("y ~ x1 + (1 | 1)", "the grouping factor '1' must be a column"),
    ("y ~ x1 - (1 | g)", "a random term cannot be removed: '- (1 | g)'"),
    ("y ~ x1 + (1 | `a:b`) + (1 | a:b)", "two grouping factors are called 'a:b'"),
    ("y ~ x1 + ((1 | g) + (1 | h))", "'((1 | g) + (1 | h))': a random term is added to the "
                                     "formula as a whole, as in 'y ~ x + (1 | g)'"),
    ("y ~ x1:(1 | g)", "'x1 : (1 | g)': a random term is added to the formula as a whole"),
    ("y ~ f(1 | g) + x1", "'f(1 | g)': a random term is added to the formula as a whole"),
])
def test_random_part_errors_name_the_problem(text, reason):
    with pytest.raises(ValueError, match=invalid(text) + re.escape(reason)):
        parse_formula(text)


# --- parse_formula: the response and the fixed part -------------------------------------------

@pytest.mark.parametrize("fixed_part, terms", [
    ("x1 + x2", [("x1",), ("x2",)]),
    ("x1 * x2", [("x1",), ("x2",), ("x1", "x2")]),
    ("x1:x2", [("x1", "x2")]),
    ("x1:x2 + u", [("u",), ("x1", "x2")]),  # R's order: by degree
    ("x1 * x2 - x1", [("x2",), ("x1", "x2")]),
    ("(x1 + x2 + u) ** 2", [("x1",), ("x2",), ("u",), ("x1", "x2"), ("x1", "u"), ("x2", "u")]),
    ("C(x1) + factor(x2)", [("C(x1)",), ("factor(x2)",)]),
    ("log(x1) + np.log(x2) + I(u ** 2) + {u + 1}", [("log(x1)",), ("np.log(x2)",),
                                                     ("I(u ** 2)",), ("I(u + 1)",)]),
    ("scale(x1) + center(x2) + scale(log(u))", [("scale(x1)",), ("center(x2)",),
                                                ("scale(log(u))",)]),
    ("I((x1 + 1) ** 2) + I(x1 + 1 ** 2)", [("I((x1 + 1) ** 2)",), ("I(x1 + (1 ** 2))",)]),
    ("C(x1):x2", [("C(x1)", "x2")]),
    ("log(`my col`)", [("log(`my col`)",)]),
    ("1", []),
    ("0", []),
])
def test_fixed_part(fixed_part, terms):
    spec = parse_formula(f"y ~ {fixed_part} + (1 | g)", columns=COLUMNS)
    assert spec.fixed == tuple(terms)


def test_expressions_of_components():
    spec = parse_formula("y ~ x1 + I((x1 + 1) ** 2) + scale(x2) + (1 + log(t) | g)")
    assert spec.expression("x1") == ("column", "x1")
    assert spec.expression("I((x1 + 1) ** 2)") == (
        "call", "I", ("operator", "**", ("operator", "+", ("column", "x1"), ("value", 1)),
                      ("value", 2)))
    assert spec.expression("log(t)") == ("call", "log", ("column", "t"))
    assert [name for name, _ in spec.expressions] == ["x1", "I((x1 + 1) ** 2)", "scale(x2)",
                                                      "log(t)"]


def test_spec_round_trips_through_json():
    spec = parse_formula("y ~ x1 * C(a) + I(x2 ** 2) + (1 + scale(t) | a/b) + (u || h)")
    assert FormulaSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec


@pytest.mark.parametrize("text", ["y ~ 1 + x1 + (1 | g)", "y ~ 0 + x1 + (1 | g)",
                                  "y ~ -1 + x1 + (1 | g)", "y ~ x1 - 1 + (1 | g)"])
def test_fixed_intercept_terms_are_ignored(text):
    assert parse_formula(text).fixed == (("x1",),)


def test_dot_expands_to_every_column_but_response_and_grouping_columns():
    spec = parse_formula("y ~ . + (1 + t | g) + (1 | a:b)", columns=COLUMNS)
    # the slope stays a feature, as in lme4
    assert spec.fixed == (("x1",), ("x2",), ("t",), ("u",), ("h",), ("my col",))
    assert spec.terms[0].slopes == ("t",)


def test_dot_minus_a_column_drops_it_and_keeps_written_order():
    assert parse_formula("y ~ u + . - x2 - h - a - b + (1 | g)", columns=COLUMNS).fixed == (
        ("u",), ("x1",), ("t",), ("my col",))


@pytest.mark.parametrize("text, columns, reason", [
    ("y ~ . + (1 | g)", None, "'.' means every column except the response and the grouping "
                             "columns: pass columns= to expand it"),
    ("y ~ . + (1 | g)", ["y", "g"], "'.' expands to no column"),
    (". ~ x1 + (1 | g)", COLUMNS, "'.' can only stand for features"),
    ("y ~ x1 + (. | g)", COLUMNS, "'.' can only stand for features"),
    ("y ~ x1 + (1 | .)", COLUMNS, "'.' can only stand for features"),
])
def test_dot_misuse(text, columns, reason):
    with pytest.raises(ValueError, match=invalid(text) + re.escape(reason)):
        parse_formula(text, columns=columns)


def test_backtick_quotes_names_that_are_not_identifiers():
    spec = parse_formula("y ~ `my col` + x1 + (1 | g)", columns=COLUMNS)
    assert spec.fixed == (("my col",), ("x1",))


@pytest.mark.parametrize("text, reason", [
    ("y ~ x1 + 2 + (1 | g)", "the term 2 is a number, not a column or a function of columns"),
    ("y ~ foo(x1) + (1 | g)", "unknown function 'foo' in 'foo(x1)'; a formula can call I, C, "
                              "factor, scale, center, log,"),
    ("y ~ np.poly(x1) + (1 | g)", "unknown function 'np.poly'"),
    ("y ~ log(x1, 2) + (1 | g)", "'log(x1, 2)': log() takes one argument"),
    ("y ~ C(x1, levels=3) + (1 | g)", "'C(x1, levels=3)': C() takes one argument"),
    ("y ~ I(C(x1)) + (1 | g)", "'C(x1)' must be a whole term or slope"),
    ("y ~ x1[a] + (1 | g)", "'x1[a]' selects a level, which only a response can do"),
    ("y ~ `log(x1)` + log(x1) + (1 | g)", "'log(x1)' is both a column and a function call"),
    ("y ~ (1 | g)", None),
    ("np.log(y) ~ x1 + (1 | g)", "the response 'np.log(y)' must be a column"),
    ("y ~ y + x1 + (1 | g)", "the response 'y' is also used on the right of '~'"),
    ("y ~ x1 + (1 + y | g)", "the response 'y' is also used on the right of '~'"),
    ("y ~ x1 + (1 | y)", "the response 'y' is also used on the right of '~'"),
])
def test_response_and_fixed_part_must_be_usable(text, reason):
    if reason is None:  # no feature at all: X has no columns, f is a constant
        assert parse_formula(text).fixed == ()
        return
    with pytest.raises(ValueError, match=invalid(text) + re.escape(reason)):
        parse_formula(text)


def test_unknown_columns_are_named_with_the_available_ones():
    text = "y ~ x1 + log(x9) + (1 + t | grp)"
    reason = "no columns named 'x9', 'grp' in the data; its columns are 'y', 'x1', 'x2'"
    with pytest.raises(ValueError, match=invalid(text) + reason):
        parse_formula(text, columns=COLUMNS)


@pytest.mark.parametrize("text, missing", [
    ("y ~ x1 + (1 + s | g)", "'s'"),         # a slope column
    ("y ~ x1 + (1 | a:nope)", "'nope'"),     # a grouping column
    ("y ~ x1 + (1 + scale(s) | g)", "'s'"),  # a transformed slope's column
])
def test_missing_slope_and_grouping_columns_are_named(text, missing):
    with pytest.raises(ValueError, match=invalid(text) + f"no column named {missing}"):
        parse_formula(text, columns=COLUMNS)


def test_unknown_column_list_is_shortened_for_wide_data():
    columns = ["y", "g"] + [f"x{i}" for i in range(30)]
    with pytest.raises(ValueError, match=r"columns are 'y', 'g', .*, 'x7', \.\.\. \(32 in all\)"):
        parse_formula("y ~ z + (1 | g)", columns=columns)


# --- parse_formula: syntax errors --------------------------------------------------------------

@pytest.mark.parametrize("text, reason", [
    ("y ~ x1 +", "unexpected end of formula"),
    ("y ~ (1 + t g)", "Expect ')'"),
    ("~ x1", "write 'response ~ features + (1 | group)'"),
    ("y x1", "write 'response ~ features + (1 | group)'"),
    ("", "the formula is empty"),
    ("y ~ x1 x2 + (1 | g)", "unexpected 'x2'"),  # formulae alone would silently drop x2
    ("y ~ x1 + x2 | g", "unexpected '|'"),
    ("y ~ x1 + (1 ||| g)", "Don't know how to parse '|'"),
    ("y ~ x1 ~ x2", "There is more than one '~'"),
    ("y ~ x1 + $ + (1 | g)", "Unexpected character"),
    ("y ~ x1 + (x2 + 0) + (1 | g)", "these terms cannot be combined"),  # a TypeError in formulae
    ("y ~ I(x1:x2) + (1 | g)", "Can't resolve call"),
])
def test_syntax_errors_are_value_errors_naming_the_formula(text, reason):
    with pytest.raises(ValueError, match=invalid(text) + re.escape(reason)) as error:
        parse_formula(text)
    assert type(error.value) is ValueError  # no formulae exception type leaks out
    assert error.value.__cause__ is None


def test_formula_must_be_text():
    with pytest.raises(TypeError, match="formula must be a string, got list"):
        parse_formula(["y ~ x1 + (1 | g)"])


# --- FeatureEncoder ----------------------------------------------------------------------------

def test_encoder_codes_columns_by_type(frame):
    features = frame[["x", "flag", "city", "size"]]
    encoder = FeatureEncoder().fit(features)
    assert encoder.feature_names_in_.tolist() == ["x", "flag", "city", "size"]
    assert encoder.n_features_in_ == 4
    assert encoder.categories_ == {"city": ["bern", "oslo", "rome"], "size": ["l", "m", "s"]}
    np.testing.assert_array_equal(encoder.transform(features), [
        [0.5, 1.0, 1.0, 2.0],
        [np.nan, 0.0, 0.0, 1.0],
        [2.0, 1.0, -1.0, 2.0],  # a missing string is -1
        [3.0, 1.0, 2.0, 1.0],
        [4.0, 0.0, 0.0, 0.0],
        [5.0, 0.0, 1.0, -1.0],  # a missing category is -1
    ])


def test_encoder_codes_do_not_depend_on_row_order_and_unseen_values_are_minus_one():
    encoder = FeatureEncoder().fit(pd.DataFrame({"city": ["rome", "bern", "oslo"]}))
    later = pd.DataFrame({"city": pd.Categorical(["oslo", "paris", "bern", "rome"])})
    np.testing.assert_array_equal(encoder.transform(later)[:, 0], [1.0, -1.0, 0.0, 2.0])
    refit = FeatureEncoder().fit(pd.DataFrame({"city": ["oslo", "rome", "bern", "oslo"]}))
    assert refit.categories_ == encoder.categories_


def test_encoder_selects_its_columns_from_a_wider_frame(frame):
    encoder = FeatureEncoder().fit(frame[["city", "x"]])
    np.testing.assert_array_equal(encoder.transform(frame),
                                  encoder.transform(frame[["x", "g", "city"]]))
    assert encoder.transform(frame).shape == (6, 2)


def test_encoder_fits_from_dask_like_from_pandas(frame):
    features = ["x", "flag", "city", "size", "g"]
    from_pandas = FeatureEncoder().fit(frame[features])
    from_dask = FeatureEncoder().fit(dd.from_pandas(frame, npartitions=3)[features])
    assert from_dask.to_dict() == from_pandas.to_dict()
    np.testing.assert_array_equal(from_dask.transform(frame), from_pandas.transform(frame))


def test_encoder_round_trips_through_json_and_pickle(frame):
    features = frame[["x", "flag", "city", "size"]]
    encoder = FeatureEncoder().fit(features)
    from_json = FeatureEncoder.from_dict(json.loads(json.dumps(encoder.to_dict())))
    from_pickle = pickle.loads(pickle.dumps(encoder))
    for restored in (from_json, from_pickle):
        assert restored.to_dict() == encoder.to_dict()
        np.testing.assert_array_equal(restored.transform(features), encoder.transform(features))


def test_encoder_keeps_numeric_categories_json_serialisable():
    encoder = FeatureEncoder().fit(pd.DataFrame({"code": pd.Series([3, 1, 3], dtype=object)}))
    assert json.loads(json.dumps(encoder.to_dict()))["categories"] == {"code": [1, 3]}


@pytest.mark.parametrize("column, reason", [
    (pd.date_range("2024-01-01", periods=2),
     r"'when' holds datetime64\[\w+\] values: convert it to numbers first"),
    (pd.to_timedelta([1, 2], unit="s"), r"'when' holds timedelta64\[\w+\] values"),
    ([pd.Timestamp("2024-01-01").date(), None], r"'when' holds date values"),
    (["a", 1], r"'when' mixes int, str values"),
])
def test_encoder_rejects_columns_it_cannot_code(column, reason):
    with pytest.raises(ValueError, match=reason):
        FeatureEncoder().fit(pd.DataFrame({"when": column}))


def test_encoder_names_a_column_missing_or_changed_at_transform(frame):
    encoder = FeatureEncoder().fit(frame[["x", "t"]])
    with pytest.raises(ValueError, match="no column named 't' in the data"):
        encoder.transform(frame.drop(columns="t"))
    with pytest.raises(ValueError, match="feature column 'x' was numeric at fit but holds str"):
        encoder.transform(frame.assign(x=frame["city"]))


def test_encoder_must_be_fitted_and_transforms_pandas_only(frame):
    with pytest.raises(NotFittedError):
        FeatureEncoder().transform(frame)
    encoder = FeatureEncoder().fit(frame[["x"]])
    with pytest.raises(TypeError, match="call it on each partition"):
        encoder.transform(dd.from_pandas(frame, npartitions=2))


# --- ModelDesign: the fixed part ----------------------------------------------------------------

def fitted(data, text, *, full_design=True):
    spec = parse_formula(text, columns=list(data.columns))
    return ModelDesign(spec).fit(data, full_design=full_design)


def lme4_names(formulae_name):
    """formulae's design column name in lme4's spelling: 'x1:f[b]' -> 'x1:fb'."""
    return re.sub(r"\[(.*?)\]", r"\1", formulae_name)


@pytest.mark.parametrize("fixed_part", [
    "x1 * f + np.log(x2) + I(x1 ** 2) + C(k)",
    "x1:f",                                       # f by indicators of all levels: no x1 margin
    "x1 + x1:f",
    "f * h",
    "C(k):x2 + x2",
])
def test_full_design_is_the_one_formulae_builds(data, fixed_part):
    design = fitted(data, f"y ~ {fixed_part} + (1 | g)")
    X = design.transform(data).X
    expected = formulae_design_matrices(f"y ~ {fixed_part}", data).common.as_dataframe()
    expected = expected.drop(columns="Intercept").rename(columns=lme4_names)
    assert sorted(design.x_names) == sorted(expected.columns)
    np.testing.assert_allclose(X, expected[design.x_names].to_numpy(), rtol=1e-12)


def test_full_design_codes_factors_as_r(data):
    # formulae parametrises a:b without margins otherwise than R; R: indicators of every cell,
    # the first factor varying fastest (rank deficient, with the intercept the learner fits)
    design = fitted(data, "y ~ f:h + (1 | g)")
    assert design.x_names == ["fa:hu", "fb:hu", "fc:hu", "fa:hv", "fb:hv", "fc:hv"]
    expected = [(data["f"] == f) & (data["h"] == h) for h in "uv" for f in "abc"]
    np.testing.assert_array_equal(design.transform(data).X, np.column_stack(expected))
    # the order of terms is R's (by degree) and the intercept never has a column
    design = fitted(data, "y ~ 0 + x1:x2 + C(k) + (1 | g)")
    assert design.x_names == ["C(k)2", "C(k)3", "x1:x2"]
    np.testing.assert_allclose(design.transform(data).X[:, 2], data["x1"] * data["x2"])


def test_stateful_transforms_use_the_fit_rows_mean_and_sd_at_predict(data):
    design = fitted(data, "y ~ scale(x1) + center(x2) + scale(log(t)) + (1 + scale(t) | g)")
    mean, sd = data["x1"].mean(), data["x1"].std(ddof=1)  # R's scale: sd with n - 1
    assert design.stateful["scale(x1)"] == pytest.approx((mean, sd))
    assert design.stateful["center(x2)"] == pytest.approx((data["x2"].mean(), 1.0))
    later = data.iloc[:7].assign(x1=[10.0, 20, 30, 40, 50, 60, 70], t=np.arange(1.0, 8.0))
    arrays = design.transform(later)
    np.testing.assert_allclose(arrays.X[:, 0], (later["x1"] - mean) / sd)
    np.testing.assert_allclose(arrays.X[:, 1], later["x2"] - data["x2"].mean())
    log_t = np.log(data["t"])
    np.testing.assert_allclose(arrays.X[:, 2], (np.log(later["t"]) - log_t.mean()) / log_t.std())
    np.testing.assert_allclose(arrays.Z[0][:, 1], (later["t"] - data["t"].mean())
                               / data["t"].std())


def test_nested_stateful_transforms_are_learned_inner_first(data):
    design = fitted(data, "y ~ scale(center(x1) ** 2) + (1 | g)")
    squared = (data["x1"] - data["x1"].mean()) ** 2
    np.testing.assert_allclose(design.transform(data).X[:, 0],
                               (squared - squared.mean()) / squared.std())


def test_unseen_and_missing_levels_give_zero_indicators(data):
    design = fitted(data, "y ~ x1 * f + (1 | g)")
    later = data.iloc[:3].assign(f=["b", "zebra", None], x1=[1.0, 2.0, 3.0])
    X = pd.DataFrame(design.transform(later).X, columns=design.x_names)
    np.testing.assert_array_equal(X[["fb", "fc", "x1:fb", "x1:fc"]].to_numpy(),
                                  [[1, 0, 1, 0], [0, 0, 0, 0], [0, 0, 0, 0]])


def test_tree_design_is_the_columns_the_fixed_part_reads(data, caplog):
    text = "y ~ x1 * f + log(x2) + C(k) + (1 + t | g)"
    with caplog.at_level(logging.INFO, logger="merf_dask.formula"):
        design = fitted(data, text, full_design=False)
    assert design.x_names == ["x1", "f", "x2", "k"]
    expected = FeatureEncoder().fit(data[["x1", "f", "x2", "k"]]).transform(data)
    np.testing.assert_array_equal(design.transform(data).X, expected)
    said = [r.getMessage() for r in caplog.records if "trees find interactions" in r.getMessage()]
    assert len(said) == 1 and "x1, f, x2, k" in said[0]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="merf_dask.formula"):
        fitted(data, "y ~ x1 + f + (1 | g)", full_design=False)  # nothing for trees to find
    assert not caplog.records


@pytest.mark.parametrize("full_design", [True, False])
def test_no_features_give_x_without_columns(data, full_design):
    arrays = fitted(data, "y ~ 1 + (1 | g)", full_design=full_design).transform(data)
    assert arrays.X.shape == (len(data), 0)


# --- ModelDesign: the random part ---------------------------------------------------------------

def test_several_factors_each_get_groups_and_z(data):
    design = fitted(data, "y ~ x1 + (1 + t | g) + (1 | h) + (0 + x2 | g)")
    assert [(f.name, f.columns, f.z_names, f.blocks) for f in design.factors] == [
        ("g", ("g",), ("(Intercept)", "t", "x2"), ((0, 1), (2,))),
        ("h", ("h",), ("(Intercept)",), ((0,),))]
    arrays = design.transform(data)
    np.testing.assert_array_equal(arrays.groups[0], data["g"])
    np.testing.assert_array_equal(arrays.groups[1], data["h"])
    np.testing.assert_array_equal(arrays.Z[0], np.column_stack([np.ones(len(data)), data["t"],
                                                                data["x2"]]))
    np.testing.assert_array_equal(arrays.Z[1], np.ones((len(data), 1)))


@pytest.mark.parametrize("random_part, blocks", [
    ("(1 | g) + (0 + t | g)", ((0,), (1,))),
    ("(t || g)", ((0,), (1,))),
    ("(1 + t | g)", ((0, 1),)),
])
def test_terms_of_one_factor_are_uncorrelated_blocks(data, random_part, blocks):
    (factor,) = fitted(data, f"y ~ x1 + {random_part}").factors
    assert factor.z_names == ("(Intercept)", "t") and factor.blocks == blocks


def test_nested_and_interaction_factors_are_labelled_as_lme4(data):
    design = fitted(data, "y ~ x1 + (1 | school/class)")
    assert [f.name for f in design.factors] == ["school", "school:class"]
    groups = design.transform(data).groups
    np.testing.assert_array_equal(groups[0], data["school"])
    assert list(groups[1]) == list(data["school"] + ":" + data["class"])
    assert len(set(groups[1])) == 6  # c1 of s1 is not c1 of s2
    numbers = data.assign(k=data["k"].astype(float))
    labels = fitted(numbers, "y ~ x1 + (1 | h:k)").transform(numbers).groups[0]
    assert labels[0] == f"{numbers['h'].iloc[0]}:{numbers['k'].iloc[0]}"


def test_categorical_slopes_are_treatment_coded(data):
    design = fitted(data, "y ~ x1 + (1 + f | g) + (0 + C(k) | h)")
    g, h = design.factors
    assert g.z_names == ("(Intercept)", "fb", "fc")   # a, the first level, is the reference
    assert h.z_names == ("C(k)1", "C(k)2", "C(k)3")   # no intercept: every level
    Z = design.transform(data).Z
    np.testing.assert_array_equal(Z[0], np.column_stack(
        [np.ones(len(data)), data["f"] == "b", data["f"] == "c"]))
    np.testing.assert_array_equal(Z[1], np.column_stack([data["k"] == k for k in (1, 2, 3)]))
    # an unseen level at predict time has zeros in its indicators
    later = data.iloc[:2].assign(f=["c", "new"])
    np.testing.assert_array_equal(design.transform(later).Z[0], [[1, 0, 1], [1, 0, 0]])


def test_double_bar_with_a_categorical_slope_follows_lme4(data):
    # lme4's (1 + f || g) is (1 | g) + (0 + f | g): every level of f in its own block
    (factor,) = fitted(data, "y ~ x1 + (1 + f || g)").factors
    assert factor.z_names == ("(Intercept)", "fa", "fb", "fc")
    assert factor.blocks == ((0,), (1, 2, 3))


# --- ModelDesign: errors that name the problem ---------------------------------------------

def test_a_grouping_factor_with_a_level_per_row_is_refused(data):
    with pytest.raises(ValueError, match=r"grouping factor 'g:x1' has as many levels as the "
                                         r"data has rows \(60\)"):
        fitted(data, "y ~ x2 + (1 | g) + (1 | g:x1)")


@pytest.mark.parametrize("npartitions", [None, 3])
def test_missing_grouping_values_are_refused_naming_the_column(data, npartitions):
    holed = data.assign(h=data["h"].where(np.arange(len(data)) % 7 != 0))
    source = holed if npartitions is None else dd.from_pandas(holed, npartitions=npartitions)
    with pytest.raises(ValueError, match="grouping column 'h' has 9 missing ids"):
        fitted(source, "y ~ x1 + (1 | g) + (1 | g:h)")
    design = fitted(data, "y ~ x1 + (1 | g) + (1 | g:h)")
    with pytest.raises(ValueError, match="grouping column 'h' has 9 missing ids"):
        design.transform(holed, require_response=False)


@pytest.mark.parametrize("slope, values, reason", [
    ("s", [1.0, np.nan] * 30, "random slope 's' has 30 missing values"),
    ("log(s)", [1.0, -1.0] * 30, "random slope 'log(s)' has 30 missing values"),
    ("s", ["p", "q", None] * 20, "random slope 's' has 20 missing values"),
])
def test_missing_slope_values_are_refused(data, slope, values, reason):
    with pytest.raises(ValueError, match=re.escape(reason)):
        with np.errstate(invalid="ignore"):
            fitted(data.assign(s=values), f"y ~ x1 + (1 + {slope} | g)").transform(
                data.assign(s=values))


@pytest.mark.parametrize("text, reason", [
    ("y ~ x1 + (1 + f | g)", "random slope 'f' is categorical with 1 level(s) ['a'] at fit"),
    ("y ~ scale(x1) + (1 | g)", "scale(x1): x1 has no variance, so it cannot be scaled"),
    ("y ~ C(x1) + (1 | g)", "fixed-effects term 'C(x1)' is categorical with 1 level(s)"),
    ("y ~ log(f) + (1 | g)", "fixed-effects term 'log(f)' cannot be computed from the data"),
])
def test_design_errors_name_the_term(data, text, reason):
    constant = data.assign(f="a", x1=2.0)
    with pytest.raises(ValueError, match=re.escape(reason)):
        fitted(constant, text).transform(constant)


def test_a_numeric_column_that_holds_strings_at_predict_is_named(data):
    design = fitted(data, "y ~ x1 + (1 + t | g)")
    with pytest.raises(ValueError, match="random slope 't' holds str values; it must be numeric"):
        design.transform(data.assign(t="five"))
    with pytest.raises(ValueError, match=re.escape("formula 'y ~ x1 + (1 + t | g)': no column "
                                                   "named 't'")):
        design.transform(data.drop(columns="t"))


def test_design_columns_with_one_name_are_refused(data):
    clash = data.assign(fb=1.0)
    with pytest.raises(ValueError, match="several columns named 'fb'"):
        fitted(clash, "y ~ f + fb + (1 | g)")


# --- ModelDesign: transform, round trips, Dask ------------------------------------------------

FORMULAS = [
    "y ~ x1 * f + np.log(x2) + I(x1 ** 2) + scale(t) + C(k) + (1 + t | g) + (1 | h)",
    "y ~ x1 + (1 + f | g) + (0 + scale(t) | h)",
    "y ~ x1 + (1 | school/class) + (t || h)",
    "y ~ 1 + (1 | g)",
]


@pytest.mark.parametrize("text", FORMULAS)
@pytest.mark.parametrize("full_design", [True, False])
def test_design_round_trips_through_json_and_pickle(data, text, full_design):
    design = fitted(data, text, full_design=full_design)
    state = json.loads(json.dumps(design.to_dict()))
    for restored in (ModelDesign.from_dict(state), pickle.loads(pickle.dumps(design))):
        assert restored.to_dict() == state
        assert restored.x_names == design.x_names and restored.factors == design.factors
        for got, want in zip(restored.transform(data), design.transform(data)):
            if isinstance(want, list):
                for a, b in zip(got, want):
                    np.testing.assert_array_equal(a, b)
            else:
                np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("text", FORMULAS)
@pytest.mark.parametrize("full_design", [True, False])
def test_design_from_dask_partitions_is_the_design_from_pandas(data, text, full_design):
    from_pandas = fitted(data, text, full_design=full_design)
    from_dask = fitted(dd.from_pandas(data, npartitions=4), text, full_design=full_design)
    assert from_dask.levels == from_pandas.levels
    assert from_dask.stateful.keys() == from_pandas.stateful.keys()
    for name, pair in from_pandas.stateful.items():
        assert from_dask.stateful[name] == pytest.approx(pair, rel=1e-12)
    dask_arrays, pandas_arrays = from_dask.transform(data), from_pandas.transform(data)
    np.testing.assert_allclose(dask_arrays.X, pandas_arrays.X, rtol=1e-12)
    for got, want in zip(dask_arrays.Z, pandas_arrays.Z):
        np.testing.assert_allclose(got, want, rtol=1e-12)


def test_transform_of_an_empty_partition(data):
    arrays = fitted(data, FORMULAS[0]).transform(data.iloc[:0])
    assert arrays.X.shape == (0, 10) and arrays.y.shape == (0,)
    assert [Z.shape for Z in arrays.Z] == [(0, 2), (0, 1)]
    assert [g.shape for g in arrays.groups] == [(0,), (0,)]


def test_transform_response_for_prediction(frame):
    design = fitted(frame, "y ~ x + (1 | g)")
    assert design.transform(frame.drop(columns="y"), require_response=False).y is None
    with_missing = frame.assign(y=np.nan)
    assert np.isnan(design.transform(with_missing, require_response=False).y).all()
    with pytest.raises(ValueError, match=r"formula 'y ~ x \+ \(1 \| g\)': no column named 'y'"):
        design.transform(frame.drop(columns="y"))
    with pytest.raises(ValueError, match="response column 'y' has 6 missing values"):
        design.transform(with_missing)


def test_design_must_be_fitted_and_transforms_pandas_only(frame):
    design = ModelDesign(parse_formula("y ~ x + (1 | g)"))
    with pytest.raises(NotFittedError, match="call fit"):
        design.transform(frame)
    design.fit(frame, full_design=False)
    with pytest.raises(TypeError, match="call it on each partition"):
        design.transform(dd.from_pandas(frame, npartitions=2))
