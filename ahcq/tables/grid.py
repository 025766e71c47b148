"""Table spec (YAML) -> the cells it needs: one ``test_quant.py`` run each (``test_quant_video.py`` for a
model whose config is a video-run YAML), cached by its parameters.

A cell's folder is named by a hash of everything its result depends on (model config, config overrides,
run options and, for a quantized cell, the *resolved* quantization config), so any change to a preset or
overlay gives a new cell while an unchanged one is found again and not rerun. The float baseline depends
on the model and run options only (not on the seed), so every table shares one FP cell per (model, prompt
source). ``run.seeds: [s, ...]`` makes every quantized entry one cell per seed, shown as mean ± std.
Each quantized cell's ``q_config.yaml`` is its method preset (``base:``) plus the spec's overlays, loaded
by the project's own config loader, so an overlay means exactly what it would mean in a hand-written YAML.
"""
from __future__ import annotations

import enum
import hashlib
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ahcq.quantization.config import ConfigError, load_qconfig
from ahcq.yaml_schema import SchemaError, bad_value, check_keys, expand_env, read_yaml, require_mapping

__all__ = ["Cell", "ModelSpec", "Plan", "Ref", "Spec", "SpecError", "TableKind", "TableSpec", "load_spec",
           "plan_tables"]

REPO = Path(__file__).resolve().parents[2]
FP_PRESET = ("minmax", 4)


class TableKind(str, enum.Enum):
    """What a table of a spec is: methods x (model, bits); variants of one method; a grid over two config
    keys; or register counts (no runs)."""

    METHODS = "methods"
    VARIANTS = "variants"
    GRID = "grid"
    REGISTERS = "registers"


RUN_KEYS = {"quant_encoder": bool, "seed": int, "seeds": list, "limit": int, "calib_images": int,
            "calib_max_boxes": int}


class SpecError(SchemaError):
    """A table spec is malformed; the message names the file and the key."""


@dataclass(frozen=True)
class ModelSpec:
    """A column group: an mmdet config (model x prompt source) and its ``--cfg-options``, or a video-run
    YAML (``.yaml``: SAM2 on video clips, run by ``test_quant_video.py``; no cfg_options)."""

    name: str
    label: str
    config: Path
    cfg_options: dict[str, Any]
    video: bool = False


@dataclass(frozen=True)
class RowSpec:
    """A row of a ``variants`` table: components switched on and/or its own overlays."""

    label: str
    tag: str
    on: tuple[str, ...]
    overlays: list[dict[str, Any]]


@dataclass
class TableSpec:
    """One table of the spec; which fields matter depends on ``kind``."""

    name: str
    kind: TableKind
    caption: str
    models: list[str]
    bits: list[int]
    method: str = ""
    methods: list[str] = field(default_factory=list)
    fp_row: bool = False
    components: dict[str, dict[str, Any]] = field(default_factory=dict)
    disabled: dict[str, Any] = field(default_factory=dict)
    rows: list[RowSpec] = field(default_factory=list)
    grid_axes: list[tuple[str, str, list[Any]]] = field(default_factory=list)
    as_list: bool = False
    metric: str | None = None
    raw: dict[str, Any] = field(default_factory=dict)


@dataclass
class Spec:
    """A loaded spec: shared run options and overlays, the models, the tables."""

    path: Path
    title: str
    caption: str
    metric: str
    run: dict[str, Any]
    overlays: list[dict[str, Any]]
    models: dict[str, ModelSpec]
    tables: list[TableSpec]
    presets: Path = REPO / "exp"

    def preset(self, method: str, bits: int) -> Path:
        path = self.presets / method / f"w{bits}a{bits}.yaml"
        if not path.is_file():
            raise SpecError(f"{self.path}: no preset {method} at W{bits}A{bits} (expected {path})")
        return path


@dataclass(frozen=True)
class Cell:
    """One ``test_quant.py`` run; ``kind`` is ``fp`` (float only) or ``quant`` (quantized only)."""

    key: str
    kind: str
    model: ModelSpec
    slug: str
    q_config_text: str
    run: dict[str, Any]

    def out_dir(self, root: Path) -> Path:
        return root / "cells" / self.model.name / f"{self.slug}-{self.key[:12]}"


@dataclass(frozen=True)
class Ref:
    """A table entry filled with its cells' metric once they have run: one cell, or one per seed."""

    keys: tuple[str, ...]


@dataclass
class Plan:
    """A table to render: header and rows whose entries are text or :class:`Ref`."""

    name: str
    caption: str
    header: list[str]
    rows: list[list[str | Ref]] = field(default_factory=list)
    metric: str = "segm_mAP"


def _digest(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


class _Cells:
    """Builds and de-duplicates the cells of a spec (a cell used by several tables runs once)."""

    def __init__(self, spec: Spec) -> None:
        self.spec = spec
        self.cells: dict[str, Cell] = {}
        self.stamps: dict[str, tuple[str, int, int] | None] = {}

    def _model_payload(self, model: ModelSpec, run: dict[str, Any]) -> dict[str, Any]:
        config = model.config
        shown = config.relative_to(REPO) if config.is_relative_to(REPO) else config
        if model.name not in self.stamps:
            self.stamps[model.name] = _checkpoint_stamp(model)
        return {"config": str(shown), "cfg_options": model.cfg_options, "run": run,
                "checkpoint": self.stamps[model.name]}

    def _runs(self) -> list[dict[str, Any]]:
        """The run options of each seed of a quantized entry."""
        run = {k: v for k, v in self.spec.run.items() if k != "seeds"}
        seeds = self.spec.run.get("seeds")
        return [run] if not seeds else [{**run, "seed": s} for s in seeds]

    def fp(self, model: ModelSpec) -> Ref:
        run = {k: v for k, v in self.spec.run.items() if k not in ("seed", "seeds")}
        key = _digest({"kind": "fp", **self._model_payload(model, run)})
        text = f"base: {self.spec.preset(*FP_PRESET).resolve()}\n"
        self.cells.setdefault(key, Cell(key, "fp", model, "fp", text, run))
        return Ref((key,))

    def quant(self, model: ModelSpec, method: str, bits: int, overlays: list[dict[str, Any]],
              tag: str = "") -> Ref:
        layers = [*self.spec.overlays, *overlays]
        text = f"base: {self.spec.preset(method, bits).resolve()}\n"
        overlay = merge(layers)
        if overlay:
            text += yaml.safe_dump(overlay, sort_keys=True)
        resolved = _resolve(text, f"{method} W{bits}A{bits} {tag}".strip())
        keys = []
        for run in self._runs():
            key = _digest({"kind": "quant", **self._model_payload(model, run), "qconfig": resolved})
            slug = f"{method}_w{bits}a{bits}" + (f"_{tag}" if tag else "")
            slug += f"_s{run['seed']}" if "seeds" in self.spec.run else ""
            self.cells.setdefault(key, Cell(key, "quant", model, slug, text, run))
            keys.append(key)
        return Ref(tuple(keys))


def _checkpoint_stamp(model: ModelSpec) -> tuple[str, int, int] | None:
    """Path, size and mtime of the SAM checkpoint: retrained weights make new cells, not stale cache hits."""
    try:
        if model.video:
            ckpt = Path(expand_env(read_yaml(model.config))["model"]["checkpoint"])
        else:
            import mmcv

            cfg = mmcv.Config.fromfile(str(model.config))
            cfg.merge_from_dict(model.cfg_options)
            ckpt = Path(cfg.model.sam.checkpoint)
        stat = ckpt.stat()
    except Exception:  # a bad config or a missing checkpoint fails in its cell, with test_quant's message
        return None
    return str(ckpt.resolve()), stat.st_size, stat.st_mtime_ns


def _resolve(text: str, what: str) -> dict[str, Any]:
    """The config a q_config text resolves to (validated by the project's loader)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "q_config.yaml"
        path.write_text(text)
        try:
            qconfig = load_qconfig(path)
            return {**qconfig.to_dict(), **qconfig.derived()}
        except ConfigError as err:
            raise ConfigError(f"cell {what}: {err}") from None


def _bits_label(bits: int) -> str:
    return f"W{bits}A{bits}"


def _columns(spec: Spec, table: TableSpec) -> list[tuple[ModelSpec, int]]:
    return [(spec.models[m], b) for m in table.models for b in table.bits]


def _methods(cells: _Cells, table: TableSpec) -> Plan:
    cols = _columns(cells.spec, table)
    plan = Plan(table.name, table.caption, ["Method", *(f"{m.label} {_bits_label(b)}" for m, b in cols)])
    if table.fp_row:
        plan.rows.append(["FP", *(cells.fp(m) for m, _ in cols)])
    for method in table.methods:
        plan.rows.append([method, *(cells.quant(m, method, b, []) for m, b in cols)])
    return plan


def _variants(cells: _Cells, table: TableSpec) -> Plan:
    cols = _columns(cells.spec, table)
    marks = list(table.components)
    header = ["Variant", *marks, *(f"{m.label} {_bits_label(b)}" for m, b in cols)]
    plan = Plan(table.name, table.caption, header)
    if table.fp_row:
        plan.rows.append(["FP", *([""] * len(marks)), *(cells.fp(m) for m, _ in cols)])
    for row in table.rows:
        layers = ([table.disabled] if marks else []) + [table.components[c] for c in row.on] + row.overlays
        flags = ["✓" if c in row.on else "✗" for c in marks]
        refs = [cells.quant(m, table.method, b, layers, row.tag) for m, b in cols]
        plan.rows.append([row.label, *flags, *refs])
    return plan


def _grid(cells: _Cells, table: TableSpec) -> Plan:
    model, bits = cells.spec.models[table.models[0]], table.bits[0]
    (rkey, rname, rvals), (ckey, cname, cvals) = table.grid_axes
    corner = f"{rname} \\ {cname}"
    plan = Plan(table.name, table.caption, [corner, *(str(v) for v in cvals)])
    for rv in rvals:
        refs = []
        for cv in cvals:
            layers = [_at(rkey, rv, table.as_list), _at(ckey, cv, table.as_list)]
            refs.append(cells.quant(model, table.method, bits, layers, f"{rname}{rv}_{cname}{cv}"))
        plan.rows.append([str(rv), *refs])
    return plan


def _at(dotted: str, value: Any, as_list: bool) -> dict[str, Any]:
    """``a.b`` = v as a nested overlay mapping."""
    out: Any = [value] if as_list else value
    for part in reversed(dotted.split(".")):
        out = {part: out}
    return out


_BUILDERS = {TableKind.METHODS: _methods, TableKind.VARIANTS: _variants, TableKind.GRID: _grid}


def plan_tables(spec: Spec, only: list[str] | None = None) -> tuple[list[Plan], dict[str, Cell]]:
    """The run tables of ``spec`` (restricted to ``only``) as plans, with the unique cells they need."""
    cells = _Cells(spec)
    chosen = [t for t in spec.tables if t.kind in _BUILDERS and (not only or t.name in only)]
    plans = [_BUILDERS[t.kind](cells, t) for t in chosen]
    for plan, table in zip(plans, chosen):
        plan.metric = table.metric or spec.metric
    return plans, cells.cells


# ------------------------------------------------------------------------------------------------ loading
def merge(layers: list[dict[str, Any]]) -> dict[str, Any]:
    """Deep-merge overlay mappings in order (mappings merge, anything else replaces), as ``base:`` does."""
    out: dict[str, Any] = {}
    for layer in layers:
        out = _merge2(out, layer)
    return out


def _merge2(base: dict[str, Any], child: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in child.items():
        both = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = _merge2(out[key], value) if both else value
    return out


def _is(value: Any, kind: type) -> bool:
    """``isinstance`` where a bool is not an int."""
    return isinstance(value, kind) and (kind is bool or not isinstance(value, bool))


class _Reader:
    """Typed access to a spec mapping; errors name the spec file and the dotted key."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def fail(self, key: str, expected: str, value: Any) -> SpecError:
        return bad_value(str(self.path), key, value, expected, SpecError)

    def mapping(self, data: Any, key: str, allowed: tuple[str, ...]) -> dict[str, Any]:
        data = require_mapping(str(self.path), key, data, SpecError)
        check_keys(str(self.path), key, data, allowed, SpecError)
        return data

    def items(self, data: Any, key: str, kind: type, min_len: int = 1) -> list[Any]:
        ok = isinstance(data, list) and len(data) >= min_len
        if not ok or not all(_is(v, kind) for v in data):
            raise self.fail(key, f"a list of at least {min_len} {kind.__name__}", data)
        return list(data)

    def overlay(self, data: Any, key: str) -> dict[str, Any]:
        """An inline mapping, or a YAML file path relative to the spec file. A relative
        ``mixed.sensitivity`` is made absolute against the file it is written in, since a cell's q_config
        lives elsewhere."""
        folder = self.path.parent
        if isinstance(data, str):
            path = self.path.parent / data
            if not path.is_file():
                raise SpecError(f"{self.path}: {key}: overlay file {data!r} not found (relative to the spec)")
            data = read_yaml(path, cls=SpecError) or {}
            if "base" in data or "root" in data:
                raise SpecError(f"{self.path}: {key}: an overlay may not include a base")
            folder = path.parent
        if not isinstance(data, dict):
            raise self.fail(key, "a q_config mapping or an overlay file path", data)
        mixed = data.get("mixed")
        if isinstance(mixed, dict) and isinstance(mixed.get("sensitivity"), str):
            data = {**data, "mixed": {**mixed, "sensitivity": str((folder / mixed["sensitivity"]).resolve())}}
        return data

    def overlays(self, data: Any, key: str) -> list[dict[str, Any]]:
        if not isinstance(data, list):
            raise self.fail(key, "a list of overlays", data)
        return [self.overlay(v, f"{key}.{i}") for i, v in enumerate(data)]


def _models(r: _Reader, data: Any) -> dict[str, ModelSpec]:
    if not isinstance(data, dict) or not data:
        raise r.fail("models", "a mapping of model names to {label, config, cfg_options}", data)
    out = {}
    for name, m in data.items():
        m = r.mapping(m, f"models.{name}", ("label", "config", "cfg_options"))
        if not isinstance(m.get("config"), str):
            raise r.fail(f"models.{name}.config", "an mmdet config path", m.get("config"))
        config = Path(m["config"])
        config = (config if config.is_file() else REPO / config).resolve()
        opts = m.get("cfg_options", {})
        if not isinstance(opts, dict):
            raise r.fail(f"models.{name}.cfg_options", "a mapping of mmdet config keys to values", opts)
        video = config.suffix in (".yaml", ".yml")
        if video and opts:
            raise r.fail(f"models.{name}.cfg_options", "absent for a video-run YAML (set keys in the YAML)",
                         opts)
        out[name] = ModelSpec(name, str(m.get("label", name)), config, dict(opts), video)
    return out


def _run(r: _Reader, data: Any) -> dict[str, Any]:
    data = r.mapping(data or {}, "run", tuple(RUN_KEYS))
    for key, value in data.items():
        if value is not None and not _is(value, RUN_KEYS[key]):
            raise r.fail(f"run.{key}", f"null or {RUN_KEYS[key].__name__}", value)
    seeds = data.get("seeds")
    if seeds is not None:
        if not seeds or not all(_is(s, int) and s >= 0 for s in seeds) or len(set(seeds)) != len(seeds):
            raise r.fail("run.seeds", "a list of distinct integers >= 0", seeds)
        if "seed" in data:
            raise r.fail("run.seed", "absent when run.seeds is given", data["seed"])
    return {"quant_encoder": True, **data}


_TABLE_KEYS = ("name", "kind", "caption", "models", "bits", "method", "methods", "fp_row", "components",
               "disabled", "rows", "row", "col", "as_list", "archs", "groups", "scale_bits", "metric")


def _table(r: _Reader, data: Any, i: int, models: dict[str, ModelSpec]) -> TableSpec:
    data = r.mapping(data, f"tables.{i}", _TABLE_KEYS)
    where = f"tables.{i}"
    kinds = [k.value for k in TableKind]
    if data.get("kind") not in kinds:
        raise r.fail(f"{where}.kind", f"one of {', '.join(kinds)}", data.get("kind"))
    kind = TableKind(data["kind"])
    t = TableSpec(name=str(data.get("name", f"table{i}")), kind=kind, caption=str(data.get("caption", "")),
                  models=r.items(data.get("models", list(models)), f"{where}.models", str),
                  bits=r.items(data.get("bits", [4]), f"{where}.bits", int), fp_row=bool(data.get("fp_row")),
                  raw=data)
    if "metric" in data:
        if not isinstance(data["metric"], str):
            raise r.fail(f"{where}.metric", "a results key (segm_mAP, official/J&F, ...)", data["metric"])
        t.metric = data["metric"]
    for m in t.models:
        if m not in models and kind is not TableKind.REGISTERS:
            raise r.fail(f"{where}.models", f"names among {', '.join(models)}", m)
    if kind is TableKind.METHODS:
        t.methods = r.items(data.get("methods"), f"{where}.methods", str)
    elif kind in (TableKind.VARIANTS, TableKind.GRID):
        if not isinstance(data.get("method"), str):
            raise r.fail(f"{where}.method", "the base method preset name", data.get("method"))
        t.method = data["method"]
    if kind is TableKind.VARIANTS:
        _variant_rows(r, data, t, where)
    if kind is TableKind.GRID:
        if len(t.models) != 1 or len(t.bits) != 1:
            raise r.fail(f"{where}", "a grid over one model and one bit width (models: [m], bits: [b])",
                         {"models": t.models, "bits": t.bits})
        t.as_list = bool(data.get("as_list", False))
        for axis in ("row", "col"):
            a = r.mapping(data.get(axis), f"{where}.{axis}", ("key", "name", "values"))
            vals = data[axis].get("values")
            if not isinstance(a.get("key"), str) or not isinstance(vals, list) or not vals:
                raise r.fail(f"{where}.{axis}", "{key: dotted.config.key, name, values: [...]}", a)
            t.grid_axes.append((a["key"], str(a.get("name", a["key"])), vals))
    return t


def _variant_rows(r: _Reader, data: dict[str, Any], t: TableSpec, where: str) -> None:
    comps = data.get("components", {})
    if not isinstance(comps, dict):
        raise r.fail(f"{where}.components", "a mapping of component names to overlays", comps)
    t.components = {k: r.overlay(v, f"{where}.components.{k}") for k, v in comps.items()}
    t.disabled = r.overlay(data.get("disabled", {}), f"{where}.disabled")
    for j, row in enumerate(r.items(data.get("rows"), f"{where}.rows", dict)):
        row = r.mapping(row, f"{where}.rows.{j}", ("label", "tag", "enable", "overlays"))
        on = tuple(row.get("enable", ()))
        if any(c not in t.components for c in on):
            raise r.fail(f"{where}.rows.{j}.enable", f"names among {', '.join(t.components)}", list(on))
        label = str(row.get("label", "+".join(on) or "base"))
        tag = str(row.get("tag", "_".join(on).lower() or "base"))
        overlays = r.overlays(row.get("overlays", []), f"{where}.rows.{j}.overlays")
        t.rows.append(RowSpec(label, tag, on, overlays))


def load_spec(path: str | Path) -> Spec:
    """Read and validate a table spec; every overlay is loaded so a bad path fails before any run."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"--spec: no such file {str(path)!r}")
    r = _Reader(path)
    data = r.mapping(read_yaml(path, cls=SpecError), "",
                     ("title", "caption", "metric", "run", "overlays", "models", "tables"))
    models = _models(r, data.get("models"))
    tables = [_table(r, t, i, models) for i, t in enumerate(r.items(data.get("tables"), "tables", dict))]
    names = [t.name for t in tables]
    if len(set(names)) != len(names):
        raise r.fail("tables", "distinct table names", names)
    return Spec(path=path, title=str(data.get("title", path.stem)), caption=str(data.get("caption", "")),
                metric=str(data.get("metric", "segm_mAP")), run=_run(r, data.get("run")),
                overlays=r.overlays(data.get("overlays", []), "overlays"), models=models, tables=tables)
