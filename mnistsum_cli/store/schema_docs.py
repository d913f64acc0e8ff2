"""docs/schemas.md, rendered from the declarations of schemas.py: one table per artifact and
one of the training settings (tests/test_schemas.py keeps the file equal to `markdown()`).

Regenerate it with
`python -c "from mnistsum_cli.store.schema_docs import markdown; print(markdown(), end='')" > docs/schemas.md`.
"""

from __future__ import annotations

from mnistsum_cli.store.diskfiles import MIB
from mnistsum_cli.store.schemas import SCHEMAS, SETTINGS_RECORD
from mnistsum_cli.store.validation import ListOf, Record


def _rows(record: Record, prefix: str = "") -> list[str]:
    """Table rows of a record; nested records (but not the settings) are flattened as a.b, a[].b."""
    rows = []
    for name, field in record.fields.items():
        kind = field.kind
        inner = kind.item if isinstance(kind, ListOf) and isinstance(kind.item, Record) else kind
        optional = "" if field.required else " (optional)"
        rows.append(f"| `{prefix}{name}` | {kind.text()}{optional} | {field.meaning} |")
        if isinstance(inner, Record) and inner.fields and inner is not SETTINGS_RECORD:
            rows += _rows(inner, f"{prefix}{name}{'[]' if inner is not kind else ''}.")
    return rows


def markdown() -> str:
    """docs/schemas.md: one table per artifact (a test keeps the file equal to this)."""
    parts = [
        "# Artifact schemas",
        "",
        "Generated from `mnistsum_cli/store/schemas.py`, which every reader checks its input against: a file that",
        "does not fit is refused in one line naming the file, the field and the stage to rerun.",
        "Fields not listed are ignored (except in the training settings). Every number is finite: JSON",
        "has no NaN or infinity and no writer of mnistsum writes one, so one in a file is refused.",
    ]
    for schema in SCHEMAS:
        rules = "".join(f" Also {rule}." for rule, _ in schema.rules)
        cap = f" At most {schema.max_bytes / MIB:g} MiB: a larger file is refused unread."
        parts += [
            "",
            f"## {schema.file_description}",
            "",
            f"Written by `mnistsum {schema.stage}`. {schema.about}{rules}{cap}",
            "",
        ]
        parts += ["| field | type | meaning |", "| --- | --- | --- |", *_rows(schema.record)]
    parts += [
        "",
        "## training settings",
        "",
        "Every field optional (the default of `TrainConfig`); no others allowed.",
        "",
    ]
    parts += ["| field | type |", "| --- | --- |"]
    parts += [f"| `{name}` | {field.kind.text()} |" for name, field in SETTINGS_RECORD.fields.items()]
    return "\n".join(parts) + "\n"
