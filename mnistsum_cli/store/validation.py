"""The kinds of value an artifact's fields may hold, and the one check of what is read against
them (`Schema.check`, `Schema.read_json`).

Each Kind checks a value (raising _Invalid with the field's path) and describes itself for the
docs (`text`); a Record is an object of named Fields; a Schema is one artifact's Record, the
stage that writes it and the rules across its fields. A value that does not fit ends as one
MnistsumError naming the file, the field and the stage to rerun, never as a KeyError or an
IndexError deep in a later stage. schemas.py declares the artifacts with these.
"""

from __future__ import annotations

import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from mnistsum_cli.errors import MnistsumError
from mnistsum_cli.store.diskfiles import MAX_SMALL_JSON_BYTES, read_json


class _Invalid(Exception):
    """A value that does not fit its declaration: where (a field path) and what is wrong."""

    def __init__(self, where: str, problem: str) -> None:
        super().__init__(where, problem)
        self.where, self.problem = where, problem


def _shown(value: Any) -> str:
    """A value in a message: short, one line."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


class Kind:
    """The kind of one value: `check` raises _Invalid, `text` describes it for the docs."""

    def check(self, value: Any, where: str) -> None:
        raise NotImplementedError

    def text(self) -> str:
        raise NotImplementedError


def _number(value: float) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _range_text(low: Optional[float], high: Optional[float], above: Optional[float] = None) -> str:
    """The bounds of a number for messages and the docs: " 0-1", " > 0, <= 10", " >= 1"."""
    if low is not None and high is not None:
        return f" {_number(low)}-{_number(high)}"
    bounds = [f"> {_number(above)}"] if above is not None else []
    bounds += [f">= {_number(low)}"] if low is not None else []
    bounds += [f"<= {_number(high)}"] if high is not None else []
    return f" {', '.join(bounds)}" if bounds else ""


@dataclass(frozen=True)
class Int(Kind):
    low: Optional[int] = None
    high: Optional[int] = None

    def check(self, value: Any, where: str) -> None:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _Invalid(where, f"is {_shown(value)}, expected an integer{_range_text(self.low, self.high)}")
        if (self.low is not None and value < self.low) or (self.high is not None and value > self.high):
            raise _Invalid(where, f"is {_shown(value)}, expected an integer{_range_text(self.low, self.high)}")

    def text(self) -> str:
        return f"integer{_range_text(self.low, self.high)}"


@dataclass(frozen=True)
class Float(Kind):
    """A finite JSON number (integers included). JSON has no NaN or infinity and no writer of
    this package writes them (writes.json_bytes refuses them; training stops at a NaN loss), so
    one in a file is damage: Python's reader would take it and pass it on to torch or a plot.
    `above`: an exclusive lower bound."""

    low: Optional[float] = None
    high: Optional[float] = None
    above: Optional[float] = None

    def check(self, value: Any, where: str) -> None:
        expected = f"expected a finite number{_range_text(self.low, self.high, self.above)}"
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _Invalid(where, f"is {_shown(value)}, {expected}")
        if (
            # an int beyond the largest float: float() of it (a plot, torch) raises OverflowError
            not (math.isfinite(value) if isinstance(value, float) else abs(value) <= sys.float_info.max)
            or (self.low is not None and value < self.low)
            or (self.high is not None and value > self.high)
            or (self.above is not None and not value > self.above)
        ):
            raise _Invalid(where, f"is {_shown(value)}, {expected}")

    def text(self) -> str:
        return f"number{_range_text(self.low, self.high, self.above)}"


@dataclass(frozen=True)
class Str(Kind):
    """A string; `choices`: the only values allowed; `pattern`: a regular expression the whole
    string must match, described for people by `pattern_text`."""

    choices: Sequence[str] = ()
    pattern: Optional[str] = None
    pattern_text: str = ""

    def check(self, value: Any, where: str) -> None:
        if not isinstance(value, str):
            raise _Invalid(where, f"is {_shown(value)}, expected {self.text()}")
        if self.choices and value not in self.choices:
            raise _Invalid(where, f"is {_shown(value)}, expected one of {', '.join(self.choices)}")
        if self.pattern is not None and not re.fullmatch(self.pattern, value):
            raise _Invalid(where, f"is {_shown(value)}, expected {self.pattern_text}")

    def text(self) -> str:
        if self.choices:
            return f"one of {', '.join(self.choices)}"
        return self.pattern_text or "string"


@dataclass(frozen=True)
class Bool(Kind):
    def check(self, value: Any, where: str) -> None:
        if not isinstance(value, bool):
            raise _Invalid(where, f"is {_shown(value)}, expected true or false")

    def text(self) -> str:
        return "true/false"


@dataclass(frozen=True)
class Nullable(Kind):
    kind: Kind

    def check(self, value: Any, where: str) -> None:
        if value is not None:
            self.kind.check(value, where)

    def text(self) -> str:
        return f"{self.kind.text()} or null"


@dataclass(frozen=True)
class ListOf(Kind):
    item: Kind
    length: Optional[int] = None  # exact length, when fixed
    min_length: int = 0
    max_length: Optional[int] = None

    def check(self, value: Any, where: str) -> None:
        if not isinstance(value, list):
            raise _Invalid(where, f"is {_shown(value)}, expected a list")
        if self.length is not None and len(value) != self.length:
            raise _Invalid(where, f"has {len(value)} entries, expected {self.length}")
        if len(value) < self.min_length:
            raise _Invalid(where, f"has {len(value)} entries, expected at least {self.min_length}")
        if self.max_length is not None and len(value) > self.max_length:
            raise _Invalid(where, f"has {len(value)} entries, expected at most {self.max_length}")
        for index, item in enumerate(value):
            self.item.check(item, f"{where}[{index}]")

    def text(self) -> str:
        size = f"{self.length} " if self.length is not None else ""
        most = f"up to {self.max_length} " if self.max_length is not None else ""
        return f"{'non-empty ' if self.min_length else ''}list of {size}{most}{self.item.text()}"


@dataclass(frozen=True)
class MapOf(Kind):
    """An object whose keys are data (split names, digits), all mapping to one kind of value."""

    value: Kind

    def check(self, value: Any, where: str) -> None:
        if not isinstance(value, dict):
            raise _Invalid(where, f"is {_shown(value)}, expected an object")
        for key, item in value.items():
            self.value.check(item, f"{where}.{key}")

    def text(self) -> str:
        return f"object of {self.value.text()}"


@dataclass(frozen=True)
class Field:
    kind: Kind
    meaning: str
    required: bool = True


@dataclass(frozen=True)
class Record(Kind):
    """An object with named fields; `closed`: fields not declared here are refused."""

    fields: dict[str, Field]
    title: str = "object"  # how the docs name it
    closed: bool = False

    def check(self, value: Any, where: str) -> None:
        if not isinstance(value, dict):
            found = "a list" if isinstance(value, list) else _shown(value)
            raise _Invalid(
                where, f"{'is' if where else 'holds'} {found}, expected an object"
            )  # "holds": the whole file
        for name, field in self.fields.items():
            inner = f"{where}.{name}" if where else name
            if name not in value:
                if field.required:
                    raise _Invalid(inner, "is missing")
                continue
            field.kind.check(value[name], inner)
        unknown = sorted(set(value) - set(self.fields)) if self.closed else []
        if unknown:
            raise _Invalid(where or "it", f"has unknown fields {', '.join(map(str, unknown))}")

    def text(self) -> str:
        return self.title


@dataclass(frozen=True)
class Schema:
    """One artifact: which file it is (and which part of it the record declares, for a binary
    file's metadata), the stage that writes it (named in errors), its fields."""

    file_description: str  # "history.json"; "model.safetensors: header metadata (each value JSON-encoded)"
    stage: str
    record: Record
    about: str
    rules: tuple[tuple[str, Callable[[dict], bool]], ...] = ()  # (what must hold, test) across fields
    max_bytes: int = MAX_SMALL_JSON_BYTES  # the largest file of this kind a reader reads (diskfiles.py says why)

    def check(self, data: Any, path: Path | str) -> Any:
        """`data` if it fits the declaration; else one MnistsumError naming the file, the
        field and the stage to rerun."""
        try:
            self.record.check(data, "")
            for rule, holds in self.rules:
                if not holds(data):
                    raise _Invalid("", f"does not satisfy {rule}")
        except _Invalid as invalid:
            what = f": {invalid.where} {invalid.problem}" if invalid.where else f" {invalid.problem}"
            raise MnistsumError(f"{path}{what}: rerun `mnistsum {self.stage}`") from None
        return data

    def read_json(self, path: Path) -> Any:
        """Read a JSON artifact of this kind and check it."""
        return self.check(read_json(path, stage=self.stage, max_bytes=self.max_bytes), path)
