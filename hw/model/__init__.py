"""Golden integer model of the HLUQ/CAG accelerator: pure numpy, no simulator needed."""
