"""Training: the step, the one loop, one run, checkpoints, finished-run keeping."""
