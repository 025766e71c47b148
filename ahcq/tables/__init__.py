"""Paper-table reproduction: a YAML spec -> cached ``test_quant.py`` cells -> markdown tables.

``grid`` reads a spec and plans the cells (one run each, named by a hash of what the result depends on),
``render`` writes the tables from the cells' ``results.json``, ``registers`` counts quantization-parameter
registers per granularity from a model's structure. The CLI is ``tools/reproduce_tables.py``.
"""
from ahcq.tables.grid import Cell, Plan, Spec, SpecError, load_spec, plan_tables
from ahcq.tables.registers import Granularity, RegisterCount, cag_sites, count_registers

__all__ = ["Cell", "Granularity", "Plan", "RegisterCount", "Spec", "SpecError", "cag_sites",
           "count_registers", "load_spec", "plan_tables"]
