"""REFILLED: generalized knowledge distillation via relationship matching."""

__version__ = "0.1.0"
