"""The process's terminal: the rich consoles, one-line errors, notes and warnings, JSON on stdout.
A base module: the store's notes and the CLI's messages share it; tables live in cli/report.py."""

from __future__ import annotations

import math
from typing import Any

from rich.console import Console
from rich.markup import escape

from mnistsum_cli.errors import OutputClosed


class _Console(Console):
    def on_broken_pipe(self) -> None:
        """Rich exits with code 1 here; let the CLI exit as a Unix tool does (errors.OutputClosed)."""
        self.quiet = True
        raise OutputClosed()


console = _Console(highlight=False)
error_console = Console(stderr=True, highlight=False)


def error(message: str) -> None:
    """One line on stderr, never wrapped."""
    error_console.print(f"[bold red]error:[/] {escape(printable(message))}", soft_wrap=True)


def notice(message: str) -> None:
    error_console.print(f"[yellow]note:[/] {escape(printable(message))}", soft_wrap=True)


def line(text: str) -> None:
    """One line on stdout as it is, never wrapped (a sweep's trial lines: several processes write them)."""
    console.print(escape(printable(text)), soft_wrap=True)


def printable(text: str) -> str:
    """`text` as valid Unicode: the bytes of a file name that are not UTF-8 (Python holds them as
    lone surrogates, which no UTF-8 output or JSON reader accepts) shown as \\xNN."""
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a surrogate that is no escaped byte
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return raw.decode("utf-8", "backslashreplace")


def print_json(data: Any) -> None:
    """`data` as one line of JSON on stdout, every string valid Unicode (see printable), and a
    number that is not finite (the confidence of NaN weights) as null: JSON has no NaN."""
    import json

    def clean(value: Any) -> Any:
        if isinstance(value, str):
            return printable(value)
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {clean(key): clean(item) for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(item) for item in value]
        return value

    print(json.dumps(clean(data)), flush=True)


def warning(message: str) -> None:
    error_console.print(f"[bold yellow]warning:[/] {escape(message)}", soft_wrap=True)


def percent(value: float) -> str:
    """A share as a percentage; "n/a" for NaN (a probability of NaN weights: no share at all)."""
    return "n/a" if math.isnan(value) else f"{100 * value:.2f}%"


def value_text(value: Any) -> str:
    """A setting's value in a line or table: a float to 4 significant digits (an lr Optuna drew
    has 17), anything else as str() writes it."""
    return f"{value:.4g}" if isinstance(value, float) else str(value)
