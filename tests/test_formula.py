"""Formula parsing, feature encoding and design matrices (merf_dask.formula)."""

import json
import pickle
import re

import dask.dataframe as dd
import numpy as np
import pandas as pd
import pytest
from sklearn.exceptions import NotFittedError

from merf_dask.formula import FeatureEncoder, FormulaSpec, design_matrices, parse_formula

COLUMNS = ["y", "x1", "x2", "t", "u", "g", "my col"]


def invalid(text):
    """The start of every error message about formula ``text``."""
    return re.escape(f"invalid formula {text!r}: ")


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


# --- parse_formula: the random part ------------------------------------------------------------

@pytest.mark.parametrize("random_part, intercept, slopes", [
    ("(1 | g)", True, ()),
    ("(1 + t | g)", True, ("t",)),
    ("(t | g)", True, ("t",)),
    ("(0 + t | g)", False, ("t",)),
    ("(-1 + t | g)", False, ("t",)),
    ("(1 + t + u | g)", True, ("t", "u")),
])
def test_random_part_follows_lme4(random_part, intercept, slopes):
    spec = parse_formula(f"y ~ x1 + x2 + {random_part}", columns=COLUMNS)
    assert spec == FormulaSpec(text=f"y ~ x1 + x2 + {random_part}", response="y",
                               fixed=("x1", "x2"), random=slopes, random_intercept=intercept,
                               group="g")
    assert spec.z_names == ("(Intercept)",) * intercept + slopes


def test_columns_lists_every_column_once_in_role_order():
    spec = parse_formula("y ~ x1 + t + (1 + t | g)")
    assert spec.columns == ("y", "x1", "t", "g")


@pytest.mark.parametrize("text", [
    "y ~ x1 + (1 | a) + (1 | b)",
    "y ~ x1 + (1 | g) + (0 + t | g)",  # lme4: two uncorrelated effects, not (1 + t | g)
    "y ~ x1 + (1 + t | g | h)",
])
def test_more_than_one_random_term_is_not_supported_yet(text):
    with pytest.raises(ValueError, match=invalid(text) + "multiple random-effects terms are not "
                                                        "supported yet"):
        parse_formula(text)


@pytest.mark.parametrize("text", ["y ~ x1 + (1 | a/b)", "y ~ x1 + (1 | a:b)",
                                  "y ~ x1 + (1 | a*b)"])
def test_nested_or_crossed_grouping_is_not_supported_yet(text):
    with pytest.raises(ValueError, match=invalid(text) + r"nested or crossed grouping factors "
                                                        r"\(a.*\) are not supported yet"):
        parse_formula(text)


@pytest.mark.parametrize("text, reason", [
    ("y ~ x1", "no random-effects term"),
    ("y ~ x1 + (t:u | g)", "random slope 't:u' must be a column"),
    ("y ~ x1 + (1 | C(g))", "the grouping factor 'C(g)' must be a column"),
])
def test_random_part_must_name_columns(text, reason):
    with pytest.raises(ValueError, match=invalid(text) + re.escape(reason)):
        parse_formula(text)


# --- parse_formula: the response and the features ------------------------------------------

@pytest.mark.parametrize("text", ["y ~ 1 + x1 + (1 | g)", "y ~ 0 + x1 + (1 | g)",
                                  "y ~ -1 + x1 + (1 | g)", "y ~ x1 - 1 + (1 | g)"])
def test_fixed_intercept_terms_are_ignored(text):
    assert parse_formula(text).fixed == ("x1",)


def test_dot_expands_to_every_column_but_response_and_group():
    spec = parse_formula("y ~ . + (1 + t | g)", columns=COLUMNS)
    assert spec.fixed == ("x1", "x2", "t", "u", "my col")  # the slope stays a feature, as in lme4
    assert spec.random == ("t",)


def test_dot_minus_a_column_drops_it_and_keeps_written_order():
    assert parse_formula("y ~ u + . - x2 + (1 | g)", columns=COLUMNS).fixed == (
        "u", "x1", "t", "my col")


@pytest.mark.parametrize("text, columns, reason", [
    ("y ~ . + (1 | g)", None, "'.' means every column except the response and the group: "
                             "pass columns= to expand it"),
    ("y ~ . + (1 | g)", ["y", "g"], "'.' expands to no column"),
    (". ~ x1 + (1 | g)", COLUMNS, "'.' can only stand for features"),
    ("y ~ x1 + (. | g)", COLUMNS, "'.' can only stand for features"),
])
def test_dot_misuse(text, columns, reason):
    with pytest.raises(ValueError, match=invalid(text) + re.escape(reason)):
        parse_formula(text, columns=columns)


def test_backtick_quotes_names_that_are_not_identifiers():
    spec = parse_formula("y ~ `my col` + x1 + (1 | g)", columns=COLUMNS)
    assert spec.fixed == ("my col", "x1")


@pytest.mark.parametrize("text", ["y ~ x1:x2 + (1 | g)", "y ~ x1 * x2 + (1 | g)",
                                  "y ~ np.log(x1) + (1 | g)", "y ~ I(x1**2) + (1 | g)",
                                  "y ~ x1 + 2 + (1 | g)"])
def test_interactions_and_transformations_are_rejected(text):
    reason = r"feature '.+' is not a column: the forest finds interactions .* list columns only"
    with pytest.raises(ValueError, match=invalid(text) + reason):
        parse_formula(text)


@pytest.mark.parametrize("text, reason", [
    ("y ~ (1 | g)", "the forest needs at least one feature column"),
    ("y ~ 1 + (1 | g)", "the forest needs at least one feature column"),
    ("np.log(y) ~ x1 + (1 | g)", "the response 'np.log(y)' must be a column"),
    ("y ~ y + x1 + (1 | g)", "the response 'y' is also used on the right of '~'"),
])
def test_response_and_features_must_be_usable(text, reason):
    with pytest.raises(ValueError, match=invalid(text) + re.escape(reason)):
        parse_formula(text)


def test_unknown_columns_are_named_with_the_available_ones():
    text = "y ~ x1 + x9 + (1 + t | grp)"
    reason = "no columns named 'x9', 'grp' in the data; its columns are 'y', 'x1', 'x2'"
    with pytest.raises(ValueError, match=invalid(text) + reason):
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
    ("y ~ x1 ~ x2", "There is more than one '~'"),
    ("y ~ x1 + $ + (1 | g)", "Unexpected character"),
    ("y ~ x1 + (1 | 1)", "these terms cannot be combined"),  # a TypeError inside formulae
    ("y ~ f(1 | g) + x1", "Can't resolve call"),
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


# --- design_matrices ---------------------------------------------------------------------------

def fitted(frame, text):
    spec = parse_formula(text, columns=list(frame.columns))
    return spec, FeatureEncoder().fit(frame[list(spec.fixed)])


def test_design_matrices_shapes_and_intercept_column(frame):
    spec, encoder = fitted(frame, "y ~ x + city + (1 + t | g)")
    X, Z, groups, y = design_matrices(frame, spec, encoder)
    assert X.shape == (6, 2) and X.dtype == np.float64
    np.testing.assert_array_equal(X, encoder.transform(frame))
    np.testing.assert_array_equal(Z, np.column_stack([np.ones(6), np.arange(1.0, 7.0)]))
    assert Z.dtype == np.float64
    assert groups.tolist() == ["a", "a", "a", "b", "b", "b"]
    np.testing.assert_array_equal(y, frame["y"].to_numpy())


def test_design_matrices_without_random_intercept_has_slopes_only(frame):
    spec, encoder = fitted(frame, "y ~ x + (0 + t + flag | g)")
    Z = design_matrices(frame, spec, encoder).Z
    np.testing.assert_array_equal(Z, frame[["t", "flag"]].to_numpy(dtype=float))


def test_design_matrices_of_an_empty_partition(frame):
    spec, encoder = fitted(frame, "y ~ x + city + (1 + t | g)")
    X, Z, groups, y = design_matrices(frame.iloc[:0], spec, encoder)
    assert (X.shape, Z.shape, groups.shape, y.shape) == ((0, 2), (0, 2), (0,), (0,))


def test_design_matrices_response_for_prediction(frame):
    spec, encoder = fitted(frame, "y ~ x + (1 | g)")
    assert design_matrices(frame.drop(columns="y"), spec, encoder, require_response=False).y is None
    with_missing = frame.assign(y=np.nan)
    assert np.isnan(design_matrices(with_missing, spec, encoder, require_response=False).y).all()
    with pytest.raises(ValueError, match=r"formula 'y ~ x \+ \(1 \| g\)': no column named 'y'"):
        design_matrices(frame.drop(columns="y"), spec, encoder)
    with pytest.raises(ValueError, match="response column 'y' has 6 missing values"):
        design_matrices(with_missing, spec, encoder)


@pytest.mark.parametrize("slope, reason", [
    (["p", "q", "r", "p", "q", "r"], "random-slope column 's' holds str values; it must be "
                                     "numeric"),
    ([1.0, np.nan, 3.0, 4.0, 5.0, 6.0], "random-slope column 's' has 1 missing values"),
])
def test_design_matrices_rejects_unusable_slope_columns(frame, slope, reason):
    frame = frame.assign(s=slope)
    spec, encoder = fitted(frame, "y ~ x + (1 + s | g)")
    with pytest.raises(ValueError, match=re.escape(reason)):
        design_matrices(frame, spec, encoder)


def test_design_matrices_needs_the_encoder_of_the_same_features(frame):
    spec, _ = fitted(frame, "y ~ x + city + (1 | g)")
    other = FeatureEncoder().fit(frame[["x"]])
    with pytest.raises(ValueError, match=r"fitted on features \['x'\] but formula .* has "
                                         r"\['x', 'city'\]"):
        design_matrices(frame, spec, other)
