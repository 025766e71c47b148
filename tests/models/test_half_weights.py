"""``float16_weights``: the model's float weights become float16 values (torch's own rounding), in float32."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from ahcq.models.half_weights import round_weights_float16


def test_every_float_tensor_of_the_state_dict_takes_torchs_float16_value():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(7, 5), nn.LayerNorm(5))
    model.register_buffer("steps", torch.arange(3))
    constant = torch.tensor([123.675, 58.395])
    model.register_buffer("pixel", constant.clone(), persistent=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert round_weights_float16(model) == 4
    assert torch.equal(model.pixel, constant)
    for key, value in model.state_dict().items():
        expected = before[key].half().float() if before[key].is_floating_point() else before[key]
        assert value.dtype == before[key].dtype and torch.equal(value, expected)
    assert not torch.equal(model[0].weight, before["0.weight"])


def test_a_value_beyond_float16_is_refused_by_name():
    model = nn.Linear(2, 2)
    with torch.no_grad():
        model.bias[0] = 1e6
    with pytest.raises(ValueError, match="bias holds values beyond float16"):
        round_weights_float16(model)
