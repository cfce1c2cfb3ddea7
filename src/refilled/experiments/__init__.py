"""Experiments: a workflow profile (load, validate) and the grid of runs its targets need. Torch-free."""
