"""The dataset-level evaluator on a researcher's own model, with and without a data plate.

The model is linear-Gaussian (``tests/written_models.py``) and the guide its exact
posterior, so every importance weight is exact and ``test_nll`` must equal the closed form:
per row with a data plate; without one, each evaluation batch is scored as a whole,
``log p(X_b) / n`` per row (labelled ``eval_scope``), which for this model (rows
independent in fact) has the same mean.
"""

from __future__ import annotations

import pytest
import written_models as wm
from torch import nn

from pyro_lvm.experiments.evaluation import evaluate
from pyro_lvm.experiments.recipes.base import Experiment


class _Written(nn.Module):
    def __init__(self, plate: bool):
        super().__init__()
        self.A, self.c, _ = wm.params()
        self.plate = plate

    def model(self, x):
        (wm.model_plate if self.plate else wm.model_no_plate)(x, self.A, self.c)

    def guide(self, x):
        (wm.guide_plate if self.plate else wm.guide_no_plate)(x, self.A, self.c)


@pytest.mark.parametrize("plate", [True, False], ids=["plate", "no-plate"])
def test_test_nll_is_exact_with_or_without_a_data_plate(float64, plate):
    lvm = _Written(plate)
    x = wm.data(10, seed=3)
    exp = Experiment(lvm=lvm, inference=None, modules=lvm)
    out = evaluate(exp, x, eval_samples=5, batch_size=4)
    exact = -wm.exact_log_likelihood(x, lvm.A, lvm.c).mean().item()
    assert out["test_nll"] == pytest.approx(exact, abs=1e-9)
    assert out["test_nelbo"] == pytest.approx(exact, abs=1e-9)
    if plate:
        assert "eval_scope" not in out
    else:
        assert out["eval_scope"] == "batches of 4 rows (the model has no data plate)"
