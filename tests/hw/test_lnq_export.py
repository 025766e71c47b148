"""LNQ probabilities exported by ahcq decode, through the accelerator's ROM table, to the fake-quant values
within half a table LSB."""
from __future__ import annotations

import numpy as np
import torch

from ahcq.quantization import export
from ahcq.quantization.quantizers import LNQuantizer, Mode, Role
from hw.model.lnq import LUT_FRAC, lnq_table


def test_exported_lnq_table_matches_p_ref(tmp_path) -> None:
    probs = torch.softmax(torch.randn(4, 16, 16, generator=torch.Generator().manual_seed(0)) * 3, dim=-1)
    q = LNQuantizer(Role.ATTN_PROB, 4, name="attn.softmax_quantizer")
    q.set_mode(Mode.CALIBRATE)
    q(probs)
    q.set_mode(Mode.QUANTIZE)
    data = export.export_attention_probs(q, probs, tmp_path / "lnq.npz")
    values = lnq_table(data["levels"])[data["codes"]] * 2.0**-LUT_FRAC
    assert np.abs(values - data["p_ref"]).max() <= 2.0 ** -(LUT_FRAC + 1) + 1e-7
