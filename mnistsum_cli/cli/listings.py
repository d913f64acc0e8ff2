"""The listings `mnistsum runs` and `mnistsum sweep --show` print: one row per run or trial,
readable at any width. In a terminal, a table whose columns wrap only between words (no column
narrower than its longest word); where even that does not fit, one wrapped entry per row. Piped,
plain aligned columns, one line per row, for less, grep and sort (--json and --csv give every
column to programs).
"""

from __future__ import annotations

import datetime as _dt
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from rich.cells import cell_len
from rich.table import Table
from rich.text import Text

from mnistsum_cli.terminal import console, printable, value_text

if TYPE_CHECKING:
    from mnistsum_cli.sweep.summary import ShownStudy
    from mnistsum_cli.training.runlist import RunEntry

GAP = 2  # spaces between two columns (one where two do not fit a terminal)
SHORT_ID = 8  # characters of a run id shown; `compare` takes any unique prefix


@dataclass
class Listing:
    """A title, the column headers, a row of cells per entry, and lines under them (a caption,
    the best trial, the folders that hold no run)."""

    title: str
    headers: list[str]
    rows: list[list[str]]
    notes: list[str] = field(default_factory=list)


def show(listing: Listing) -> None:
    """Print `listing` in the layout the output allows (see the module's docstring)."""
    if not console.is_terminal:
        print_plain(listing)
        return
    console.print(Text(printable(listing.title), style="bold"))
    for gap in (GAP, 1):  # columns closer together before giving up the table
        widths = fitted_widths(listing, console.width, gap)
        if widths is not None:
            print_table(listing, widths, gap)
            break
    else:
        print_entries(listing)
    for note in listing.notes:
        console.print(Text(printable(note)))  # wrapped between words at the terminal's width


def print_plain(listing: Listing) -> None:
    """Aligned columns, each row on one line however long: what `| less -S` and grep want."""
    table = [listing.headers, *listing.rows]
    widths = [max(cell_len(row[index]) for row in table) for index in range(len(listing.headers))]
    right = right_aligned(listing)
    say(listing.title)
    for row in table:
        say((" " * GAP).join(pad(cell, width, flush) for cell, width, flush in zip(row, widths, right)).rstrip())
    for note in listing.notes:
        say(note)


def say(text: str) -> None:
    """One line as it is: never wrapped, nothing in it read as markup."""
    console.print(Text(printable(text)), soft_wrap=True)


def pad(cell: str, width: int, right: bool) -> str:
    space = " " * (width - cell_len(cell))
    return space + cell if right else cell + space


def right_aligned(listing: Listing) -> list[bool]:
    """Per column: whether it holds numbers only (those align on the right)."""
    return [all(is_number(row[index]) for row in listing.rows if row[index]) for index in range(len(listing.headers))]


def is_number(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True


def fitted_widths(listing: Listing, width: int, gap: int) -> Optional[list[int]]:
    """Each column's width in a table at most `width` wide, `gap` spaces between two columns: its widest cell, the widest columns
    narrowed first, none below its longest word (so no word, header or run id is split); None
    when the longest words alone do not fit."""
    table = [listing.headers, *listing.rows]
    columns = range(len(listing.headers))
    widths = [max(cell_len(row[index]) for row in table) for index in columns]
    least = [max(longest_word(row[index]) for row in table) for index in columns]
    room = width - gap * (len(widths) - 1)
    if sum(least) > room:
        return None
    while sum(widths) > room:
        widest = max((index for index in columns if widths[index] > least[index]), key=lambda index: widths[index])
        widths[widest] -= 1
    return widths


def longest_word(cell: str) -> int:
    return max((cell_len(word) for word in cell.split()), default=0)


def print_table(listing: Listing, widths: list[int], gap: int) -> None:
    table = Table(
        box=None,
        padding=(0, 1),
        collapse_padding=gap == 1,  # the padding of two neighbours is one space, not two
        pad_edge=False,
        header_style="bold underline",
        expand=False,
    )
    for header, width, right in zip(listing.headers, widths, right_aligned(listing)):
        table.add_column(Text(header), width=width, justify="right" if right else "left", overflow="fold")
    for row in listing.rows:
        table.add_row(*(Text(printable(cell)) for cell in row))
    console.print(table)


def print_entries(listing: Listing) -> None:
    """A row per entry: its first cell, then `header value` of each filled cell, wrapped between
    words beside the first cell (for a terminal too narrow for the table)."""
    grid = Table.grid(padding=(0, GAP))
    grid.add_column(no_wrap=True)
    grid.add_column()
    for row in listing.rows:
        rest = ", ".join(f"{header} {cell}" for header, cell in zip(listing.headers[1:], row[1:]) if cell)
        grid.add_row(Text(printable(row[0])), Text(printable(rest)))
    console.print(grid)


# --------------------------------------------------------------------------- the listings


def share(value: Optional[float]) -> str:
    """An accuracy in % without the sign (the title says it): columns stay narrow."""
    if value is None:
        return ""
    return "n/a" if math.isnan(value) else f"{100 * value:.2f}"


def started_text(started: Optional[str]) -> str:
    """A run's start (ISO 8601, UTC) in local time, as `ls -l` shows a file's: `Dec 02 20:32`."""
    if not started:
        return ""
    try:
        return _dt.datetime.fromisoformat(started).astimezone().strftime("%b %d %H:%M")
    except ValueError:
        return started


def device_text(row: dict[str, Any]) -> str:
    processes = f" {row['world_size']} processes" if row["world_size"] not in (1, None) else ""
    return " ".join(str(row[key]) for key in ("device", "precision") if row[key]) + processes


def trial_text(row: dict[str, Any]) -> str:
    """A run's sweep trial: `study #3 pruned 41.25` (a pruned trial's value is its last epoch's)."""
    if row["study"] is None:
        return ""
    return f"{row['study']} #{row['trial']} {row['trial_state']} {share(row['trial_value'])}".rstrip()


def runs_table(entries: list[RunEntry], differ: list[str], same: dict[str, Any], folder: Path) -> None:
    """`mnistsum runs`: one row per run (short id, start, state, the settings that differ, device
    where it differs, training seconds, val and test accuracy, sweep trial); the settings equal
    for all in the caption; the folders that hold no readable run under the table."""
    from mnistsum_cli.training.runlist import settings_text

    runs = [entry.row for entry in entries if entry.readable]
    notes = [f"{shown_folder(entry.folder, folder)}: {entry.row['state']}" for entry in entries if not entry.readable]
    if not runs:
        for text in (f"no runs in {folder}", *notes):
            say(text)
        return
    devices = {device_text(row) for row in runs}
    tested = any(row["test_sum_accuracy"] is not None for row in runs)
    trials = any(row["study"] is not None for row in runs)
    headers = [
        "run id",
        "started",
        "state",
        *differ,
        *(["device"] if len(devices) > 1 else []),
        "train s",
        "val digit",
        "val sum",
        *(["test digit", "test sum"] if tested else []),
        *(["sweep trial"] if trials else []),
    ]
    rows = [
        [
            str(row["run_id"])[:SHORT_ID],
            started_text(row["started"]),
            row["state"],
            *[value_text(row[name]) for name in differ],
            *([device_text(row)] if len(devices) > 1 else []),
            f"{row['train_seconds']:.1f}",
            share(row["val_digit_accuracy"]),
            share(row["val_sum_accuracy"]),
            *([share(row["test_digit_accuracy"]), share(row["test_sum_accuracy"])] if tested else []),
            *([trial_text(row)] if trials else []),
        ]
        for row in runs
    ]
    caption = [settings_text(same)] if same else []
    caption += [f"on {device}" for device in devices if device and len(devices) == 1]
    caption_line = [f"all runs: {', '.join(caption)}"] if caption else []
    show(Listing(f"runs in {folder} (accuracy in %)", headers, rows, caption_line + notes))


def shown_folder(path: Path, folder: Path) -> str:
    """A folder inside the artifacts folder by its path there (previous/notes), others as given."""
    try:
        return str(path.relative_to(folder)) or "."
    except ValueError:
        return str(path)


def sweep_table(shown: ShownStudy) -> None:
    """`mnistsum sweep --show`: one row per trial of the study, then the best trial(s)."""
    if not shown.rows:
        say(f"{shown.title}: no trials yet")
        return
    retries = any(row["retry_of"] is not None for row in shown.rows)
    headers = ["trial", "state", "val sum", "train s", "epochs", *shown.names, *(["retry of"] if retries else [])]
    rows = [
        [
            str(row["number"]),
            row["state"],
            share(row["val_sum_accuracy"]),
            f"{row['seconds']:.1f}" if row["seconds"] is not None else "",
            str(row["epochs_done"] if row["epochs_done"] is not None else ""),
            *[value_text(row[name]) for name in shown.names],
            *([str(row["retry_of"] if row["retry_of"] is not None else "")] if retries else []),
        ]
        for row in shown.rows
    ]
    show(Listing(f"{shown.title} (accuracy in %)", headers, rows, shown.best))
