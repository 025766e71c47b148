"""Config loading: the reference repositories' YAML format, includes, and error messages."""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from ahcq.quantization.config import (
    METHOD_PRESETS,
    ConfigError,
    ConfigWarning,
    QConfig,
    load_qconfig,
    parse_qconfig,
)
from ahcq.quantization.recipe import quantize_from_config

FIXTURES = Path(__file__).parent / "fixtures"

# Canonical names of the reference class names, written out by hand (independent of the module's table).
EXPECTED_NAMES = {
    "LSQFakeQuantize": "lsq",
    "AdaRoundFakeQuantize": "adaround",
    "AvgMinMaxObserver": "avg_minmax",
    "MSEObserver": "mse",
    "AvgMSEFastObserver": "avg_mse",
}


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _error(path: Path) -> str:
    with pytest.raises(ConfigError) as info:
        load_qconfig(path)
    return str(info.value)


A = "a_qconfig:\n  bit: "
W4 = "w_qconfig:\n  bit: 4\n"
MINIMAL = A + "4\n" + W4


@pytest.mark.parametrize("fixture", sorted(p.name for p in FIXTURES.glob("*.yaml")))
@pytest.mark.filterwarnings("ignore::ahcq.quantization.config.ConfigWarning")
def test_reference_fixture_loads_with_its_values(fixture: str) -> None:
    path = FIXTURES / fixture
    raw = yaml.safe_load(path.read_text())
    cfg = load_qconfig(path)
    a_raw = raw.get("a_qconfig", raw.get("encoder_a_qconfig"))
    w_raw = raw.get("w_qconfig", raw.get("encoder_w_qconfig"))
    for spec, spec_raw in ((cfg.a_qconfig, a_raw), (cfg.w_qconfig, w_raw)):
        assert spec.quantizer == EXPECTED_NAMES[spec_raw["quantizer"]]
        assert spec.observer == EXPECTED_NAMES[spec_raw["observer"]]
        assert spec.bit == spec_raw["bit"] and spec.symmetric is spec_raw["symmetric"]
        assert spec.ch_axis == spec_raw["ch_axis"]
    calibrate = raw["calibrate"]
    assert cfg.calibrate == (calibrate["sample"] if isinstance(calibrate, dict) else calibrate)
    if "recon" not in raw:
        assert not cfg.recon.enabled
        return
    recon = raw["recon"]
    assert cfg.recon.scale_lr == pytest.approx(float(recon["scale_lr"]))
    saq = "encoder_a_qconfig" in raw  # SAQ-SAM's code never adds the regulariser its YAML weighs
    weight = 0.0 if saq else recon["weight"]
    assert (cfg.recon.iters, cfg.recon.weight, cfg.recon.drop_prob) == (recon["iters"], weight, 0.5)
    assert cfg.recon.b_range == (20.0, 2.0)
    assert cfg.ptq4sam.big is raw["ptq4sam"]["BIG"] and cfg.ptq4sam.agq is raw["ptq4sam"]["AGQ"]
    assert cfg.ptq4sam.global_num == raw["ptq4sam"]["global_num"]
    if "ahcptq" in raw:
        assert (cfg.ahcptq.cag, cfg.ahcptq.group, cfg.ahcptq.hluq) == (True, 4, True)
        assert cfg.cag.groups == raw["ahcptq"]["group"]
    if "iters_CAMS" in recon:
        assert cfg.recon.iters_cams == recon["iters_CAMS"]
        assert cfg.decoder_a_qconfig == cfg.a_qconfig and cfg.encoder_w_qconfig == cfg.w_qconfig


def test_to_dict_round_trips(tmp_path: Path) -> None:
    with pytest.warns(ConfigWarning, match="keep_gpu"):
        cfg = load_qconfig(FIXTURES / "ahcptq_config55.yaml")
    dumped = _write(tmp_path / "dump.yaml", yaml.safe_dump(cfg.to_dict()))
    again = load_qconfig(dumped)
    assert again == dataclasses.replace(cfg, source=str(dumped))
    assert parse_qconfig(cfg.to_dict()) == dataclasses.replace(cfg, source="<dict>")
    assert cfg.to_dict()["recon"]["iters_CAMS"] == 2000 and cfg.to_dict()["ptq4sam"]["BIG"] is True


def test_defaults_and_frozen(tmp_path: Path) -> None:
    cfg = load_qconfig(_write(tmp_path / "m.yaml", MINIMAL))
    a, w = cfg.a_qconfig, cfg.w_qconfig
    assert (a.quantizer, a.observer, a.ch_axis) == ("lsq", "avg_minmax", -1)
    assert (w.quantizer, w.observer, w.ch_axis) == ("adaround", "mse", 0)
    assert not cfg.recon.enabled and not cfg.recon.dropping  # no recon: section, no reconstruction
    assert not cfg.acnr.enabled and cfg.pcc.threshold == cfg.ptq4sam.threshold == 0.5
    assert load_qconfig(_write(tmp_path / "r.yaml", MINIMAL + "recon: {}\n")).recon.dropping
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.seed = 3  # type: ignore[misc]
    assert isinstance(cfg, QConfig) and set(METHOD_PRESETS) >= {"minmax", "brecq", "qdrop", "ahcqsam"}


def test_include_resolution(tmp_path: Path) -> None:
    _write(tmp_path / "parent" / "base.yaml", MINIMAL + "recon:\n  iters: 100\n  drop_prob: 0.5\n"
           "lnq:\n  alphas: [1, 2, 3]\n")
    child = _write(tmp_path / "kids" / "child.yaml", "base: ../parent/base.yaml\nrecon:\n  iters: 7\n"
                   "lnq:\n  alphas: [5]\na_qconfig:\n  bit: 6\n")
    cfg = load_qconfig(child)
    assert cfg.recon.iters == 7 and cfg.recon.drop_prob == 0.5  # nested merge keeps siblings
    assert cfg.lnq.alphas == (5.0,)  # lists replace, never concatenate
    assert cfg.a_qconfig.bit == 6 and cfg.w_qconfig.bit == 4
    grandchild = _write(tmp_path / "kids" / "g.yaml", "root: child.yaml\nseed: 11\n")
    assert load_qconfig(grandchild).recon.iters == 7 and load_qconfig(grandchild).seed == 11


def test_split_encoder_decoder_override_and_float(tmp_path: Path) -> None:
    text = MINIMAL + ("overrides:\n  - pattern: 'neck.*'\n    float: true\n"
                      "  - pattern: 'blocks.0.*'\n    a_qconfig: {bit: 8, observer: MSEObserver}\n")
    cfg = load_qconfig(_write(tmp_path / "o.yaml", text))
    assert cfg.overrides[0].keep_float and cfg.overrides[0].pattern == "neck.*"
    assert dict(cfg.overrides[1].act) == {"bit": 8, "observer": "mse"} and cfg.overrides[1].weight == ()


@pytest.mark.parametrize(
    ("text", "key", "allowed"),
    [
        (MINIMAL + "colour: red\n", "colour", ["a_qconfig", "recon", "acnr", "overrides"]),
        (MINIMAL + "recon:\n  itres: 5\n", "recon.itres", ["iters", "drop_prob", "scale_lr"]),
        (MINIMAL + "recon:\n  early_stop:\n    patiense: 3\n", "recon.early_stop.patiense",
         ["patience", "min_delta"]),
        (A + "4\n  colour: 1\n" + W4, "a_qconfig.colour", ["observer", "ch_axis"]),
    ],
)
def test_unknown_keys_name_file_key_and_allowed(tmp_path: Path, text: str, key: str, allowed: list) -> None:
    path = _write(tmp_path / "bad.yaml", text)
    message = _error(path)
    assert message.startswith(f"{path}: {key}: unknown key")
    assert all(a in message for a in allowed)


@pytest.mark.parametrize(
    ("text", "key", "expected"),
    [
        (A + "9\n" + W4, "a_qconfig.bit", "9 is not allowed; expected an integer in 2..8"),
        (A + "four\n" + W4, "a_qconfig.bit", "'four' is not allowed; expected an integer in 2..8"),
        (A + "true\n" + W4, "a_qconfig.bit", "True is not allowed; expected an integer in 2..8"),
        (MINIMAL + "recon:\n  drop_prob: 1.5\n", "recon.drop_prob", "expected a number in [0.0, 1.0]"),
        (MINIMAL + "recon:\n  early_stop:\n    min_delta: 1\n", "recon.early_stop.min_delta",
         "expected a number in [0.0, 1.0)"),
        (MINIMAL + "acnr:\n  target: mode\n", "acnr.target", "expected one of mean, median, midrange"),
        (MINIMAL + "pcc:\n  percentiles: [0.99, 0.9]\n", "pcc.percentiles", "strictly increasing"),
        (MINIMAL + "recon:\n  b_range: [2, 20]\n", "recon.b_range", "start >= end"),
        (MINIMAL + "recon: 5\n", "recon", "expected a mapping"),
        ("a_qconfig:\n  bit: 4\n", "w_qconfig", "missing"),
        ("a_qconfig:\n  bit: 4\n  quantizer: LSQ\nw_qconfig:\n  bit: 4\n", "a_qconfig.quantizer",
         "expected one of lsq, fixed, adaround, hluq, lnq, agq, cag"),
        ("a_qconfig:\n  bit: 4\n  observer: KLObserver\nw_qconfig:\n  bit: 4\n", "a_qconfig.observer",
         "expected one of minmax, avg_minmax, mse, avg_mse, percentile"),
        (MINIMAL + "overrides:\n  - pattern: x\n    float: true\n    a_qconfig: {bit: 8}\n", "overrides.0",
         "cannot be combined"),
        ("a_qconfig:\n  bit: 3\nw_qconfig:\n  bit: 3\nahcptq:\n  hluq: true\n", "hluq.level_splits", "bit 3"),
        (A + "4\n  groups: 4\n" + W4, "a_qconfig.groups", "null unless the quantizer is cag"),
        (MINIMAL + "ahcptq:\n  cag: true\n  group: 4\ncag:\n  groups: 2\n", "cag.groups", "contradicts"),
        (MINIMAL + "cag:\n  weight_groups: 0\n", "cag.weight_groups", "expected an integer >= 1"),
        (MINIMAL + "cag:\n  apply_to_weights: 2\n", "cag.apply_to_weights", "expected true"),
    ],
)
def test_bad_values_name_file_key_and_expectation(tmp_path: Path, text: str, key: str, expected: str) -> None:
    path = _write(tmp_path / "bad.yaml", text)
    message = _error(path)
    assert message.startswith(f"{path}: {key}: "), message
    assert expected in message, message


def test_malformed_yaml_names_file_and_line(tmp_path: Path) -> None:
    path = _write(tmp_path / "broken.yaml", "a_qconfig:\n  bit: 4\n   symmetric: [false\nw_qconfig: {}\n")
    message = _error(path)
    assert re.match(rf"{re.escape(str(path))}: line \d+: malformed YAML", message), message
    line = int(re.search(r"line (\d+)", message).group(1))
    assert 3 <= line <= 4
    not_a_mapping = _write(tmp_path / "list.yaml", "- 1\n- 2\n")
    assert _error(not_a_mapping).startswith(f"{not_a_mapping}: the top level")


def test_missing_and_cyclic_includes(tmp_path: Path) -> None:
    child = _write(tmp_path / "c.yaml", "base: nowhere/p.yaml\n" + MINIMAL)
    message = _error(child)
    assert message.startswith(f"{child}: base: ") and "nowhere/p.yaml" in message and "not found" in message
    _write(tmp_path / "x.yaml", "base: y.yaml\n")
    _write(tmp_path / "y.yaml", "base: x.yaml\n")
    assert "include cycle" in _error(tmp_path / "x.yaml")
    assert "file not found" in _error(tmp_path / "absent.yaml")


def test_error_in_base_names_the_base_file(tmp_path: Path) -> None:
    base = _write(tmp_path / "b.yaml", MINIMAL + "recon:\n  iters: -1\n")
    child = _write(tmp_path / "c.yaml", "base: b.yaml\nseed: 1\n")
    message = _error(child)
    assert message.startswith(f"{base}: recon.iters: -1 is not allowed"), message


def test_yaml11_exponent_strings_are_numbers(tmp_path: Path) -> None:
    cfg = load_qconfig(_write(tmp_path / "e.yaml", MINIMAL + "recon:\n  scale_lr: 4e-5\n"))
    assert cfg.recon.scale_lr == 4e-5


def test_quantize_from_config_builds_the_recipe(tmp_path: Path) -> None:
    from torch import nn

    from ahcq.quantization.quantizers import AdaRoundQuantizer, CAGQuantizer, FixedQuantizer, LSQQuantizer

    text = (A + "5\n" + W4 + "seed: 3\nahcptq:\n  group: 2\n"
            "overrides:\n  - pattern: 'head'\n    float: true\n"
            "  - pattern: 'body.*'\n    a_qconfig: {quantizer: GroupLSQFakeQuantize}\n"
            "    w_qconfig: {quantizer: fixed, observer: minmax}\n")
    cfg = load_qconfig(_write(tmp_path / "q.yaml", text))
    model = nn.Module()
    model.stem, model.head, model.aux = nn.Linear(4, 8), nn.Linear(8, 2), nn.Linear(8, 2)
    model.body = nn.Sequential(nn.Linear(8, 8))
    quantize_from_config(model, cfg, skip=["aux"])
    assert type(model.head) is nn.Linear and type(model.aux) is nn.Linear
    stem, body = model.stem, model.body[0]
    assert isinstance(stem.input_quantizer, LSQQuantizer) and stem.input_quantizer.bits == 5
    assert isinstance(stem.weight_quantizer, AdaRoundQuantizer) and stem.weight_quantizer.bits == 4
    assert isinstance(body.input_quantizer, CAGQuantizer) and body.input_quantizer.bits == 5
    assert (body.input_quantizer.target_groups, body.input_quantizer.seed) == (2, 3)  # ahcptq.group, seed
    assert isinstance(body.weight_quantizer, FixedQuantizer)


def test_quantize_from_config_split_decoder(tmp_path: Path) -> None:
    from torch import nn

    text = (FIXTURES / "saqsam_config_SA_44.yaml").read_text().replace("    weight: 0.02\n", "").replace(
        "decoder_a_qconfig:\n    quantizer: LSQFakeQuantize\n    observer: AvgMSEFastObserver\n    bit: 4",
        "decoder_a_qconfig:\n    quantizer: LSQFakeQuantize\n    observer: AvgMSEFastObserver\n    bit: 6")
    cfg = load_qconfig(_write(tmp_path / "split.yaml", text))
    assert cfg.decoder_a_qconfig.bit == 6 and cfg.a_qconfig.bit == 4
    model = nn.Module()
    model.encoder, model.decoder = nn.Sequential(nn.Linear(4, 4)), nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ConfigError, match="decoder_pattern"):
        quantize_from_config(model, cfg)
    quantize_from_config(model, cfg, decoder_pattern="decoder.*")
    assert model.encoder[0].input_quantizer.bits == 4 and model.decoder[0].input_quantizer.bits == 6
    assert model.decoder[0].weight_quantizer.bits == 4
