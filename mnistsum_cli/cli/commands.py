"""The Typer command classes of the CLI: help without a `<bool>` placeholder on flags, and a
closed stdout reported as errors.OutputClosed rather than swallowed."""

from __future__ import annotations

from typing import Any

from typer.core import TyperCommand, TyperGroup

from mnistsum_cli.errors import OutputClosed


def _hide_flag_placeholders(params: list) -> list:
    """Flags take no value: show none (not `<bool>`) in --help."""
    for param in params:
        if getattr(param, "is_flag", False):
            param.metavar = ""
    return params


class Command(TyperCommand):
    def get_params(self, ctx: Any) -> list:
        return _hide_flag_placeholders(super().get_params(ctx))

    def invoke(self, ctx: Any) -> Any:
        """Run the command; a closed stdout becomes OutputClosed, which Typer (unlike a
        BrokenPipeError, which it turns into exit code 1) lets through to main()."""
        try:
            return super().invoke(ctx)
        except BrokenPipeError:
            raise OutputClosed() from None


class CommandGroup(TyperGroup):
    def get_params(self, ctx: Any) -> list:
        return _hide_flag_placeholders(super().get_params(ctx))
