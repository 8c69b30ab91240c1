"""Pure torch/numpy kernels for the four MultiViz stages (no widgets here)."""
