"""Layers of quantized SAMs written as the integer export (``ahcq.quantization.export``) for the accelerator
in ``hw/``, which reads only those ``.npz`` files: SAM-shaped layers calibrated on random data
(``synthetic_layers``) and layers of the trained testbed on real activations (``testbed_layers``)."""
