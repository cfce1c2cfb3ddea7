"""Hyper-parameter declarations of the methods (torch-free).

Every method file declares its hyper-parameters once, as a literal at the top:

    HPARAMS = {
        "tau": ("float>0", 4.0, "tuple temperature tau1 [C]"),
        ...
    }

name -> (type, default, one-line meaning). It is a literal so that the catalog can read it
from the file's source without importing torch (the Snakefile and the profile checks run
in the scheduler process). The command line (`--set key=value` and the alias flags), the
profile schema, the run fingerprint and docs/cli.md's methods table are derived from it.

Types: "float", "float>0", "float>=0", "int>=1", "k_hat" (an integer >= 1 or inf),
"bool", "choice:a|b|c".
"""

from __future__ import annotations

import ast
import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class ParamError(ValueError):
    """A hyper-parameter key or value a method does not accept; the message names both."""


@dataclass(frozen=True)
class HParam:
    name: str
    type: str
    default: Any
    meaning: str

    @property
    def choices(self) -> tuple[str, ...]:
        return tuple(self.type.split(":", 1)[1].split("|")) if self.type.startswith("choice:") else ()

    def allowed(self) -> str:
        """The allowed values, in words (error messages, docs/cli.md)."""
        if self.choices:
            return "one of " + ", ".join(self.choices)
        return {"float": "a number", "float>0": "a number > 0", "float>=0": "a number >= 0",
                "int>=1": "an integer >= 1", "k_hat": "an integer >= 1 or inf", "bool": "true | false"}[self.type]

    def parse(self, value: Any, where: str) -> Any:
        """`value` (a string from the command line or a YAML value) as this type; ParamError otherwise."""
        bad = ParamError(f"{where}: {self.name}={value!r} is not allowed; expected {self.allowed()}")
        t = self.type
        if t.startswith("choice:"):
            if str(value) not in self.choices:
                raise bad
            return str(value)
        if t == "bool":
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("true", "1", "yes"):
                return True
            if str(value).lower() in ("false", "0", "no"):
                return False
            raise bad
        if t == "k_hat":
            if value is None or str(value).lower() in ("inf", "none"):
                return None
            if isinstance(value, float) and math.isinf(value):
                return None
            try:
                k = int(str(value))
            except ValueError:
                raise bad from None
            if k < 1:
                raise bad
            return k
        if isinstance(value, bool):
            raise bad
        try:
            x = int(str(value)) if t == "int>=1" else float(value)
        except (TypeError, ValueError):
            raise bad from None
        if (t == "int>=1" and x < 1) or (t == "float>0" and not x > 0) or (t == "float>=0" and not x >= 0) \
                or not math.isfinite(x):
            raise bad
        return x

    def format(self, value: Any) -> str:
        """A value as written on the command line and in paths: None -> 'inf', 2.0 -> '2'."""
        if self.type == "k_hat":
            return "inf" if value is None else str(int(value))
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, float):
            return f"{value:g}"
        return str(value)

    def schema(self) -> dict:
        """The JSON schema of one value in a profile's `methods:` section."""
        t = self.type
        if t.startswith("choice:"):
            return {"type": "string", "enum": list(self.choices)}
        if t == "bool":
            return {"type": "boolean"}
        if t == "k_hat":
            return {"oneOf": [{"type": "integer", "minimum": 1}, {"type": "string", "const": "inf"}]}
        if t == "int>=1":
            return {"type": "integer", "minimum": 1}
        out = {"type": "number"}
        if t == "float>0":
            out["exclusiveMinimum"] = 0
        elif t == "float>=0":
            out["minimum"] = 0
        return out


_TYPES = ("float", "float>0", "float>=0", "int>=1", "k_hat", "bool")


def read_declaration(source: Path) -> dict[str, HParam]:
    """The `HPARAMS = {...}` literal of a method file, read without importing it."""
    stat = Path(source).stat()
    return dict(_parsed_declaration(str(source), stat.st_mtime_ns, stat.st_size))


# Parsed once per file version: building the paper DAG asks for declarations tens of thousands of times.
@functools.lru_cache(maxsize=None)
def _parsed_declaration(source: str, mtime_ns: int, size: int) -> dict[str, HParam]:
    tree = ast.parse(Path(source).read_text(encoding="utf-8"), source)
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "HPARAMS" for t in node.targets):
            raw = ast.literal_eval(node.value)
            break
    else:
        return {}
    out = {}
    for name, (type_, default, meaning) in raw.items():
        if type_ not in _TYPES and not type_.startswith("choice:"):
            raise TypeError(f"{source}: HPARAMS[{name!r}] has unknown type {type_!r}")
        out[name] = HParam(name, type_, default, meaning)
    return out
