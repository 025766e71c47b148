"""Block reconstruction on a small W4A4 transformer stack: error, evaluation state, resume, determinism."""
from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from test_reconstruction_helpers import calibration_data, make_model

from ahcq.quantization.api import NotFullyQuantizedError, assert_fully_quantized, iter_quantizers
from ahcq.quantization.config import ConfigError, load_qconfig, parse_qconfig
from ahcq.quantization.quantizers import AdaRoundQuantizer, CAGQuantizer, Mode, Role
from ahcq.solver.recon import ReconSettings, reconstruct, units_from_names
from ahcq.solver.recon.train import LossContext, _Plateau, _regroup, plateau_horizon

REPO = Path(__file__).resolve().parents[2]
UNITS = ["blocks.0", "blocks.1", "blocks.2"]
FAST = dict(iters=30, weight_lr=1e-2, scale_lr=1e-3, drop_prob=0.5)


def run(model, settings, **kwargs):
    units = units_from_names(model, UNITS)
    return reconstruct(model, units, calibration_data(), settings, progress=False, **kwargs)


def output_error(model, float_model) -> float:
    with torch.no_grad():
        return sum(float((model(x) - float_model(x)).pow(2).mean()) for x in calibration_data())


def float_twin(model):
    twin = copy.deepcopy(model)
    for _, q in iter_quantizers(twin):
        q.set_mode(Mode.OFF)
    return twin


def nearest_rounding(model):
    """Calibration only: every quantizer on, AdaRound hardened at its initial (round-to-nearest) logits."""
    plain = copy.deepcopy(model)
    for _, q in iter_quantizers(plain):
        q.set_mode(Mode.QUANTIZE)
        if isinstance(q, AdaRoundQuantizer):
            q.harden()
    return plain


def assert_same_state(a, b) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


@pytest.mark.parametrize("drop_prob, bound", [(1.0, 0.8), (0.5, 0.9)])
def test_reconstruction_lowers_output_error_below_calibration_only(drop_prob, bound):
    model = make_model()
    reference, baseline = float_twin(model), nearest_rounding(model)
    run(model, ReconSettings(**{**FAST, "iters": 60, "weight_lr": 3e-2, "drop_prob": drop_prob}))
    assert output_error(model, reference) < bound * output_error(baseline, reference)


def test_after_reconstruction_everything_is_hard_and_quantized():
    model = make_model()
    result = run(model, ReconSettings(**FAST))
    assert [r.steps for r in result.reports] == [30, 30, 30]
    rounding = [q for _, q in iter_quantizers(model) if isinstance(q, AdaRoundQuantizer)]
    assert len(rounding) == 12 and all(q.is_hard for q in rounding)
    assert all(q.mode is Mode.QUANTIZE and q.drop_p == 0.0 for _, q in iter_quantizers(model))
    assert_fully_quantized(model)


def test_evaluation_refuses_dropping_or_soft_rounding():
    model = make_model()
    run(model, ReconSettings(**FAST))
    dropping = copy.deepcopy(model)
    dropping.blocks[1].fc1.input_quantizer.set_mode(Mode.DROP, drop_p=0.5)
    with pytest.raises(NotFullyQuantizedError) as err:
        assert_fully_quantized(dropping)
    assert err.value.offenders[0][0] == "blocks.1.fc1.input_quantizer"
    soft = copy.deepcopy(model)
    soft.blocks[2].fc2.weight_quantizer.hard.fill_(False)
    with pytest.raises(NotFullyQuantizedError, match="soft"):
        assert_fully_quantized(soft)


def test_qdrop_drops_only_during_reconstruction_and_a_leftover_drop_is_caught():
    model = make_model()
    seen = []

    def spy(ctx: LossContext) -> torch.Tensor:
        seen.append({q.name: (q.mode, q.drop_p) for q in ctx.unit.quantizers})
        return ctx.output.new_zeros(())

    run(model, ReconSettings(**{**FAST, "iters": 3, "drop_prob": 0.75}), extra_loss=spy)
    for modes in seen:
        for name, (mode, p) in modes.items():
            expected = (Mode.QUANTIZE, 0.0) if name.endswith("weight_quantizer") else (Mode.DROP, 0.25)
            assert (mode, p) == expected, name
    assert_fully_quantized(model)

    def sabotage(ctx: LossContext) -> torch.Tensor:
        ctx.unit.module.fc2.weight_quantizer.set_mode(Mode.DROP, drop_p=0.5)
        return ctx.output.new_zeros(())

    with pytest.raises(NotFullyQuantizedError, match="fc2.weight_quantizer"):
        run(make_model(), ReconSettings(**{**FAST, "iters": 2}), extra_loss=sabotage)


def test_brecq_never_drops():
    model = make_model()
    modes = set()

    def spy(ctx: LossContext) -> torch.Tensor:
        modes.update(q.mode for q in ctx.unit.quantizers)
        return ctx.output.new_zeros(())

    run(model, ReconSettings(**{**FAST, "iters": 2, "drop_prob": 1.0}), extra_loss=spy)
    assert modes == {Mode.QUANTIZE}


class Interrupt(Exception):
    pass


def test_resumed_run_equals_uninterrupted(tmp_path):
    settings = ReconSettings(**{**FAST, "iters": 12})
    straight = make_model()
    run(straight, settings, state_dir=tmp_path / "a")

    def stop_after_unit_1(k, unit, report):
        if k == 1:
            raise Interrupt

    with pytest.raises(Interrupt):
        run(make_model(), settings, state_dir=tmp_path / "b", on_unit_end=stop_after_unit_1)
    resumed = make_model(calibrate=False)  # a fresh process: the state brings the calibration back
    result = run(resumed, settings, state_dir=tmp_path / "b")
    assert result.resumed_at == 2 and [r.name for r in result.reports] == ["blocks.2"]
    assert_same_state(straight, resumed)
    assert_fully_quantized(resumed)
    again = make_model(calibrate=False)
    assert run(again, settings, state_dir=tmp_path / "b").reports == []
    assert_same_state(straight, again)


def test_resume_refuses_other_settings(tmp_path):
    run(make_model(), ReconSettings(**{**FAST, "iters": 2}), state_dir=tmp_path)
    with pytest.raises(ValueError, match="iters"):
        run(make_model(), ReconSettings(**{**FAST, "iters": 3}), state_dir=tmp_path)


def test_same_seed_same_state_other_seed_differs():
    a, b, c = make_model(), make_model(), make_model()
    run(a, ReconSettings(**FAST, seed=5))
    run(b, ReconSettings(**FAST, seed=5))
    run(c, ReconSettings(**FAST, seed=6))
    assert_same_state(a, b)
    alphas = [(n, t) for n, t in a.state_dict().items() if n.endswith("alpha")]
    assert any(not torch.equal(t, c.state_dict()[n]) for n, t in alphas)


def test_spilled_cache_gives_the_same_result(tmp_path):
    in_memory, on_disk = make_model(), make_model()
    run(in_memory, ReconSettings(**FAST))
    result = run(on_disk, ReconSettings(**FAST), max_cache_gb=0, cache_dir=tmp_path)
    assert result.spilled_bytes > 0 and result.peak_cache_bytes == 0
    assert_same_state(in_memory, on_disk)
    assert not any(tmp_path.iterdir())


def test_half_precision_cache_halves_the_spill_and_still_reconstructs(tmp_path):
    full, half = make_model(), make_model()
    reference, baseline = float_twin(half), nearest_rounding(half)
    settings = {**FAST, "iters": 60, "weight_lr": 3e-2, "drop_prob": 1.0}
    wide = run(full, ReconSettings(**settings), max_cache_gb=0, cache_dir=tmp_path / "float32")
    narrow = run(half, ReconSettings(**settings, cache_dtype="float16"), max_cache_gb=0,
                 cache_dir=tmp_path / "float16")
    assert narrow.spilled_bytes <= 0.55 * wide.spilled_bytes
    assert output_error(half, reference) < 0.8 * output_error(baseline, reference)
    data = load_qconfig(REPO / "exp" / "qdrop" / "w4a4.yaml").to_dict()
    data["recon"]["cache_dtype"] = "bfloat16"
    assert ReconSettings.from_qconfig(parse_qconfig(data)).cache_dtype == "bfloat16"
    data["recon"]["cache_dtype"] = "int8"
    with pytest.raises(ConfigError, match="cache_dtype"):
        parse_qconfig(data)


def test_cag_regroups_without_restarting_the_lr_schedule():
    model = make_model(cag=True)
    iters = 20
    settings = ReconSettings(**{**FAST, "iters": iters})
    result = run(model, settings)
    cosine = [settings.scale_lr * (1 + math.cos(math.pi * t / iters)) / 2 for t in range(iters)]
    for report in result.reports:
        assert report.scale_lrs == pytest.approx(cosine, rel=1e-6)
        assert all(b <= a for a, b in zip(report.scale_lrs, report.scale_lrs[1:]))
        # two CAG quantizers per block (qkv and fc1 inputs), 16 channels each: 8G = 16 -> 8 -> 4 -> 2
        assert sorted(report.regroups) == sorted([(4, 16), (8, 8), (12, 4), (16, 2)] * 2)
    cags = [q for _, q in iter_quantizers(model) if isinstance(q, CAGQuantizer)]
    assert len(cags) == 6 and all(int(q.groups) == 2 for q in cags)
    assert_fully_quantized(model)


def test_early_stop_shrinks_the_whole_schedule_at_a_warm_up_plateau():
    model = make_model(cag=True)
    # warm-up 4 of 40 steps; min_delta 0.5: the smoothed loss (EMA 0.9) cannot halve in two steps, so the
    # first value stays the best and two idle updates make the plateau
    settings = ReconSettings(**{**FAST, "iters": 40, "warm_up": 0.1, "patience": 2, "min_delta": 0.5})
    result = run(model, settings)
    horizon = 30  # plateau after 3 warm-up steps: 3 / 0.1 steps in all
    for report in result.reports:
        assert report.stopped_early and report.steps == horizon
        assert sorted(report.regroups) == sorted([(6, 16), (12, 8), (18, 4), (24, 2)] * 2)
        last = settings.scale_lr * (1 + math.cos(math.pi * (horizon - 1) / horizon)) / 2
        assert report.scale_lrs[-1] == pytest.approx(last, rel=1e-6)
    assert all(int(q.groups) == 2 for _, q in iter_quantizers(model) if isinstance(q, CAGQuantizer))
    assert_fully_quantized(model)


def test_early_stop_without_rounding_to_anneal_stops_and_still_reaches_the_final_groups():
    model = make_model(cag=True)
    settings = ReconSettings(**{**FAST, "iters": 40, "warm_up": 0.1, "weight": 0.0, "patience": 2,
                                "min_delta": 0.5})
    result = run(model, settings)
    for report in result.reports:
        assert report.stopped_early and report.steps == 3
        assert sorted(report.regroups) == sorted([(3, 16), (3, 8), (3, 4), (3, 2)] * 2)
    assert all(int(q.groups) == 2 for _, q in iter_quantizers(model) if isinstance(q, CAGQuantizer))
    assert_fully_quantized(model)


def test_plateau_counts_improvements_relative_to_the_best_value():
    plateau = _Plateau(patience=2, min_delta=0.1)
    assert not plateau.update(100.0, watch=True)  # EMA 100, the best
    assert not plateau.update(0.0, watch=True)  # EMA 90: exactly 10 % better, not more: idle 1
    assert not plateau.update(0.0, watch=True)  # EMA 81 < 90: new best, idle 0
    assert not plateau.update(81.0, watch=True)  # EMA 81: idle 1
    assert plateau.update(81.0, watch=True)  # idle 2: plateau
    unwatched = _Plateau(patience=1, min_delta=0.0)
    assert not any(unwatched.update(v, watch=False) for v in (5.0, 5.0, 5.0))


@pytest.mark.parametrize("done, iters, warm_up, expected", [(150, 5000, 0.2, 750), (1500, 5000, 0.2, 5000),
                                                           (7, 100, 0.3, 24), (1, 10, 0.9, 2)])
def test_plateau_horizon_keeps_the_warm_up_proportion(done, iters, warm_up, expected):
    settings = ReconSettings(iters=iters, warm_up=warm_up)
    assert plateau_horizon(done, settings) == expected


def test_quantized_prefix_gives_the_first_unit_quantized_inputs():
    model = make_model(quantize_stem=True)
    assert model.stem.input_quantizer is not None
    seen = []

    def spy(ctx: LossContext) -> torch.Tensor:
        if ctx.unit_index == 0:
            seen.append(ctx.inputs[0][0].detach().clone())
        return ctx.output.new_zeros(())

    run(model, ReconSettings(**{**FAST, "iters": 4, "drop_prob": 1.0}), extra_loss=spy)
    with torch.no_grad():
        stems = [model.stem(x) for x in calibration_data()]
        floats = [model.stem.float_forward(x) for x in calibration_data()]
    for inp in seen:
        assert any(torch.equal(inp, s) for s in stems)
        assert not any(torch.equal(inp, f) for f in floats)


def test_units_that_do_not_chain_need_a_feed():
    model = make_model()
    units = units_from_names(model, ["blocks.0", "blocks.2"])
    with pytest.raises(ValueError, match="feed"):
        reconstruct(model, units, calibration_data(), ReconSettings(iters=1), progress=False)


def test_uncalibrated_model_is_refused():
    model = make_model()
    model.blocks[0].fc1.input_quantizer.calibrated.fill_(False)
    with pytest.raises(RuntimeError, match="blocks.0.fc1.input_quantizer"):
        run(model, ReconSettings(iters=1))


def test_only_activation_quantizers_drop():
    model = make_model()
    roles = set()

    def spy(ctx: LossContext) -> torch.Tensor:
        roles.update(q.role for q in ctx.unit.quantizers if q.mode is Mode.DROP)
        return ctx.output.new_zeros(())

    run(model, ReconSettings(**{**FAST, "iters": 1}), extra_loss=spy)
    assert roles == {Role.INPUT, Role.QUERY, Role.KEY}


def test_regroup_restarts_only_the_regrouped_adam_state():
    model = make_model(cag=True)
    cag = model.blocks[0].qkv.input_quantizer
    other = model.blocks[0].proj.input_quantizer.scale
    optimizer = torch.optim.Adam([cag.scale, other], lr=1e-3)
    (cag.scale.sum() + other.sum()).backward()
    optimizer.step()
    before = optimizer.state[other]["exp_avg"].clone()
    _regroup(cag, 8, optimizer)
    assert cag.scale not in optimizer.state and torch.equal(optimizer.state[other]["exp_avg"], before)
    assert [id(p) for p in optimizer.param_groups[0]["params"]] == [id(cag.scale), id(other)]
    assert int(cag.groups) == 8


@pytest.mark.parametrize("quantize_stem, passes", [(False, 1), (True, 2)])
def test_the_prefix_runs_once_per_sample_whatever_the_unit_count(quantize_stem, passes):
    model = make_model(quantize_stem=quantize_stem)
    calls = []
    model.stem.register_forward_hook(lambda *args: calls.append(1))
    run(model, ReconSettings(**{**FAST, "iters": 2}))
    assert len(calls) == passes * len(calibration_data())


def test_a_unit_may_train_longer_than_the_run():
    model = make_model()
    units = units_from_names(model, UNITS)
    units[2].iters = 5
    settings = ReconSettings(**{**FAST, "iters": 2})
    result = reconstruct(model, units, calibration_data(), settings, progress=False)
    assert [r.steps for r in result.reports] == [2, 2, 5]


def test_batches_of_several_samples_are_stacked():
    model = make_model()
    sizes = []

    def spy(ctx: LossContext) -> torch.Tensor:
        sizes.append((len(ctx.entries), ctx.inputs[0][0].shape[0], ctx.targets[0].shape[0]))
        return ctx.output.new_zeros(())

    run(model, ReconSettings(**{**FAST, "iters": 2, "batch_size": 3}), extra_loss=spy)
    assert sizes == [(3, 6, 6)] * 6  # 3 samples of 2 sequences, 2 steps x 3 units
    assert_fully_quantized(model)
