"""Operator tools around the workflow: bench, doctor, pin, plan and the FLOPs table."""
