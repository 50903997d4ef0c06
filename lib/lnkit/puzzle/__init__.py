"""Puzzle (paper Section 2): assemble an inference-efficient child model from a library of per-layer
block variants. ``mip`` picks one variant per layer (or per sub-block) under hardware budgets."""
