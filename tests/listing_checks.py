"""Checks that a listing (`mnistsum runs`, `sweep --show`) is readable: no line wider than the
terminal, no header word split over two lines, each row's id on one line."""

from __future__ import annotations

from typing import Optional


def assert_readable(out: str, title: str, headers: list[str], ids: list[str], width: Optional[int]) -> list[str]:
    """The lines of `out`, checked: the first is `title`; each at most `width` wide (None: piped,
    any width); the lines from the title to the first row hold the header words, each whole; each
    id is a word of a line."""
    lines = out.splitlines()
    assert lines[0] == title, out
    if width is not None:
        assert all(len(line) <= width for line in lines), "\n".join(line for line in lines if len(line) > width)
    first = next(index for index, line in enumerate(lines) if ids[0] in line.split())
    words = {word for header in headers for word in header.split()}
    shown = {word for line in lines[1:first] for word in line.split()}
    assert shown == words, f"header words split or missing: {sorted(shown ^ words)}\n{out}"
    for run in ids:
        assert any(run in line.split() for line in lines), f"{run} is not whole on one line:\n{out}"
    return lines
