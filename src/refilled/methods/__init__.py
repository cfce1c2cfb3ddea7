"""Training methods. Each holds the model it trains (and a frozen teacher where it has
one) and returns `(logits, {term name: loss})` for a batch; the loop sums the terms."""

from refilled.methods.base import CrossEntropy, Method

METHODS = {"ce": CrossEntropy}

__all__ = ["METHODS", "CrossEntropy", "Method"]
