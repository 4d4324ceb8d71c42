"""scikit-learn's estimator conventions, for a formula estimator and merf 1.0's array API.

``sklearn.utils.estimator_checks`` is called directly for the checks that need no fit. The
checks that fit call ``fit(X, y)`` on a plain matrix, which MERF cannot take (it needs Z and
clusters, or one frame described by ``formula=``): check_fit_check_is_fitted,
check_estimators_overwrite_params, check_dont_overwrite_parameters, check_n_features_in,
check_estimators_pickle and the rest of ``check_estimator``. What they check is done here by hand
on clustered data: fitting leaves the parameters alone and adds only attributes ending in ``_``,
clones are unfitted, a pickled model predicts the same, unfitted models raise NotFittedError.
"""

import inspect
import pickle
import re

import joblib
import numpy as np
import pytest
from sklearn.base import BaseEstimator, clone
from sklearn.ensemble import RandomForestRegressor
from sklearn.exceptions import NotFittedError
from sklearn.utils import estimator_checks
from sklearn.utils.validation import check_is_fitted

from merf_dask import MERF, MERFClassifier

from helpers import simulate_lmm

pytestmark = [
    # a few EM iterations of a 10-tree forest: neither converges nor reaches every row out of bag
    pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning"),
    pytest.mark.filterwarnings("ignore:.*training rows had no member:UserWarning"),
]

FORMULA = "y ~ x1 + x2 + x3 + (1 + t | g)"


def small_forest():
    return RandomForestRegressor(n_estimators=10, min_samples_leaf=5, random_state=0)


#: unfitted estimators the checks run on: defaults, a formula, and a learner with settings
ESTIMATORS = {
    "default": lambda: MERF(),
    "formula": lambda: MERF(formula=FORMULA),
    "forest": lambda: MERF(small_forest(), max_iterations=3, random_state=0),
    "classifier": lambda: MERFClassifier(formula=FORMULA),
}


@pytest.fixture(scope="module")
def frame():
    return simulate_lmm(n_clusters=30, seed=0, max_size=20)


def arrays(frame):
    """merf 1.0's fit(X, Z, clusters, y) of the same data as FORMULA."""
    Z = np.column_stack([np.ones(len(frame)), frame["t"]])
    return frame[["x1", "x2", "x3"]], Z, frame["g"], frame["y"]


def fit_formula(frame):
    return MERF(small_forest(), formula=FORMULA, max_iterations=3, random_state=0).fit(frame)


def fit_arrays(frame):
    return MERF(small_forest(), max_iterations=3, random_state=0).fit(*arrays(frame))


@pytest.fixture(scope="module", params=["formula", "arrays"])
def fitted(request, frame):
    """(fitted model, the arguments of its predict) for both APIs."""
    if request.param == "formula":
        return fit_formula(frame), (frame,)
    X, Z, g, _ = arrays(frame)
    return fit_arrays(frame), (X, Z, g)


# ------------------------------------------------------ scikit-learn's own checks, no fit

SKLEARN_CHECKS = [
    "check_parameters_default_constructible",
    "check_no_attributes_set_in_init",
    "check_get_params_invariance",
    "check_set_params",
    "check_estimator_cloneable",
    "check_estimator_repr",
    "check_do_not_raise_errors_in_init_or_set_params",
    "check_mixin_order",
    "check_estimator_tags_renamed",
    "check_valid_tag_types",
    "check_estimators_unfitted",
]


@pytest.mark.parametrize("kind", ESTIMATORS)
@pytest.mark.parametrize("check", SKLEARN_CHECKS)
def test_sklearn_estimator_check(check, kind):
    getattr(estimator_checks, check)(type(ESTIMATORS[kind]()).__name__, ESTIMATORS[kind]())


# ------------------------------------------------------------------ __init__ and params

PARAMETERS = [name for name in inspect.signature(MERF.__init__).parameters if name != "self"]


@pytest.mark.parametrize("estimator", [MERF, MERFClassifier])
def test_init_signature_is_plain_keywords(estimator):
    # no *args / **kwargs: get_params reads the parameters from the signature
    kinds = {p.kind for name, p in inspect.signature(estimator.__init__).parameters.items()
             if name != "self"}
    assert kinds <= {inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY}
    assert sorted(estimator().get_params(deep=False)) == sorted(PARAMETERS)


def test_the_classifier_is_merf_with_the_binomial_family():
    assert MERFClassifier().get_params(deep=False) == {**MERF().get_params(deep=False),
                                                       "family": "binomial"}
    assert clone(MERFClassifier(max_iterations=4)).max_iterations == 4
    with pytest.raises(ValueError, match="family"):
        MERFClassifier(family="poisson").fit(None)


def test_init_stores_every_parameter_under_its_own_name_and_nothing_else():
    # distinct sentinels: __init__ must neither validate, copy nor rename them
    sentinels = {name: type(f"Sentinel_{name}", (), {})() for name in PARAMETERS}
    model = MERF(**sentinels)
    assert vars(model).keys() == sentinels.keys()
    for name, sentinel in sentinels.items():
        assert getattr(model, name) is sentinel, name
        assert model.get_params(deep=False)[name] is sentinel, name


def test_nested_learner_parameters_are_reachable():
    model = MERF(small_forest())
    assert model.get_params()["fixed_effects_model__min_samples_leaf"] == 5
    model.set_params(fixed_effects_model__min_samples_leaf=20, max_iterations=4)
    assert model.fixed_effects_model.min_samples_leaf == 20 and model.max_iterations == 4


def _same_params(first: BaseEstimator, second: BaseEstimator) -> None:
    """Equal parameters, nested estimators compared by their own parameters."""
    a, b = first.get_params(deep=False), second.get_params(deep=False)
    assert a.keys() == b.keys()
    for name in a:
        if isinstance(a[name], BaseEstimator):
            assert type(a[name]) is type(b[name]), name
            _same_params(a[name], b[name])
        else:
            assert joblib.hash(a[name]) == joblib.hash(b[name]), name


@pytest.mark.parametrize("kind", ESTIMATORS)
def test_clone_of_an_unfitted_estimator(kind):
    model = ESTIMATORS[kind]()
    copy = clone(model)
    assert copy is not model
    _same_params(copy, model)
    if model.fixed_effects_model is not None:
        assert copy.fixed_effects_model is not model.fixed_effects_model


def test_clone_shares_the_client_instead_of_copying_it():
    class Client:  # what the client parameter asks of a distributed.Client
        def submit(self): ...

        def gather(self): ...

    client = Client()
    assert clone(MERF(client=client)).client is client


def test_clone_of_a_fitted_estimator_is_unfitted(fitted):
    model, _ = fitted
    copy = clone(model)
    _same_params(copy, model)
    with pytest.raises(NotFittedError):
        check_is_fitted(copy)
    assert not [name for name in vars(copy) if name.endswith("_")]


# ------------------------------------------------------------------------------ fitting

@pytest.mark.parametrize("api", ["formula", "arrays"])
def test_fit_changes_no_parameter_and_adds_only_trailing_underscore_attributes(frame, api):
    formula = FORMULA if api == "formula" else None
    model = MERF(small_forest(), formula=formula, max_iterations=3, random_state=0)
    before = {name: joblib.hash(value) for name, value in model.get_params().items()}
    attributes_before = set(vars(model))
    model.fit(frame) if api == "formula" else model.fit(*arrays(frame))
    # check_estimators_overwrite_params, nested learner parameters included
    assert {name: joblib.hash(value) for name, value in model.get_params().items()} == before
    # check_dont_overwrite_parameters: new public attributes end with "_"
    public = [name for name in set(vars(model)) - attributes_before if not name.startswith("_")]
    assert public and all(name.endswith("_") for name in public), sorted(public)
    check_is_fitted(model)  # check_fit_check_is_fitted


def _documented_attributes() -> list[str]:
    """The names in the ``Attributes`` section of MERF's docstring."""
    section = inspect.getdoc(MERF).split("Attributes\n----------\n", 1)[1].split("\n\n", 1)[0]
    names = []
    for line in section.splitlines():
        match = re.match(r"^([A-Za-z_][\w, ]*?) :", line)
        if match:
            names += [name.strip() for name in match.group(1).split(",")]
    return names


def test_documented_fitted_attributes_exist_and_end_with_underscore(fitted):
    model, _ = fitted
    documented = _documented_attributes()
    assert "fe_model_" in documented and "b_" in documented
    assert all(name.endswith("_") for name in documented), documented
    missing = [name for name in documented if not hasattr(model, name)]
    assert not missing, missing


def test_n_features_in_and_feature_names_in(fitted):
    model, _ = fitted
    assert model.n_features_in_ == 3
    assert list(model.feature_names_in_) == ["x1", "x2", "x3"]
    assert model.z_names_ and len(model.z_names_) == model.D_.shape[0] == 2


def test_pickle_round_trip_predicts_the_same(fitted):
    model, predict_args = fitted
    restored = pickle.loads(pickle.dumps(model))
    assert type(restored) is MERF and restored is not model
    _same_params(restored, model)
    np.testing.assert_array_equal(restored.predict(*predict_args), model.predict(*predict_args))
    for got, expected in zip(restored.predict(*predict_args, return_std=True),
                             model.predict(*predict_args, return_std=True)):
        np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(restored.b_.to_numpy(), model.b_.to_numpy())
    assert restored.summary() == model.summary()


# ------------------------------------------------------------------------ before fit

def _call(method, model, frame, tmp_path):
    X, Z, g, y = arrays(frame)
    formula = model.formula is not None
    if method == "predict":
        return model.predict(frame) if formula else model.predict(X, Z, g)
    if method == "score":
        return model.score(frame) if formula else model.score(X, Z, g, y)
    if method == "summary":
        return model.summary()
    return model.save(tmp_path / "model")


@pytest.mark.parametrize("method", ["predict", "score", "summary", "save"])
@pytest.mark.parametrize("kind", ["formula", "arrays"])
def test_unfitted_model_raises_not_fitted_error(method, kind, frame, tmp_path):
    model = MERF(formula=FORMULA) if kind == "formula" else MERF()
    with pytest.raises(NotFittedError, match="not fitted yet"):
        _call(method, model, frame, tmp_path)
    assert not (tmp_path / "model").exists()
