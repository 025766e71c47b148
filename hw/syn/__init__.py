"""yosys area estimates of the PE variants (see synth.py)."""
