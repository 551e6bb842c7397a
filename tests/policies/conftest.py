"""Fixtures and oracle adapters shared by the policies tests."""
from __future__ import annotations

import numpy as np
import pytest

from stage1.policies.audit import synthetic_scores


@pytest.fixture(scope="module")
def data():
    """(calibration scores, labels), (test scores, labels): overconfident synthetic logits."""
    cal = synthetic_scores(3000, prevalence=0.4, overconfidence=2.0, seed=1)
    test = synthetic_scores(2000, prevalence=0.4, overconfidence=2.0, seed=2)
    return cal, test


def prefit_p1_classifier():
    """A fitted scikit-learn classifier whose predict_proba is [1 - p1, p1], p1 read from column 0:
    lets MAPIE's conformal classifiers run on our calibrated probabilities."""
    from sklearn.base import BaseEstimator, ClassifierMixin

    class PrefitP1(ClassifierMixin, BaseEstimator):
        def fit(self, X, y):
            self.classes_ = np.array([0, 1])
            return self

        def predict_proba(self, X):
            p = np.asarray(X, dtype=np.float64)[:, 0]
            return np.column_stack([1.0 - p, p])

        def predict(self, X):
            return (np.asarray(X)[:, 0] >= 0.5).astype(np.int64)

    return PrefitP1().fit(None, None)
