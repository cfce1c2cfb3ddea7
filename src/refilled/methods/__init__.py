"""Training methods: one file per method (its class and its `HPARAMS`), one line per
method in `catalog.py`. This package imports no torch; the method classes are imported
by the catalog when a run builds them."""

from refilled.methods.catalog import CATALOG, Entry, get, registered, table_methods
from refilled.methods.params import HParam, ParamError

__all__ = ["CATALOG", "Entry", "HParam", "ParamError", "get", "registered", "table_methods"]
