"""Block reconstruction: the model-agnostic engine and the SAM / SAM2 adapters.

``settings`` (what decides a result) → ``units`` (what is trained, how it is fed) → ``cache`` (activations in
memory, then on disk) → ``capture`` (float pass, unit-by-unit propagation) → ``train`` (one unit's
optimisation) → ``state`` (resume) → ``engine`` (``reconstruct``: the chain of units). ``sam`` / ``sam_units``
run SAM through the engine, ``sam2`` trains SAM2's units along its quantized tracking chain.
"""
from ahcq.solver.recon.engine import ReconResult, default_forward, reconstruct
from ahcq.solver.recon.settings import ReconSettings
from ahcq.solver.recon.train import UnitReport, reconstruct_unit, unit_loss
from ahcq.solver.recon.units import ReconUnit, units_from_names

__all__ = ["ReconResult", "ReconSettings", "ReconUnit", "UnitReport", "default_forward", "reconstruct",
           "reconstruct_unit", "unit_loss", "units_from_names"]
