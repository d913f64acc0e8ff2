"""The Typer app and its command classes: how a command line becomes an exit code.

CommandGroup.main runs a command and turns every way it can end into one line on stderr and an
exit code (1 failure, 2 usage, 130 Ctrl-C, 141 when the reader of stdout went away, as in
`mnistsum evaluate | head`); Command reports a closed stdout rather than swallowing it. Both
show help without Python types as placeholders. The commands themselves live in the modules
beside this one, by concern (stages, model, experiments); app.py gathers them.
"""

from __future__ import annotations

import os
import sys
from typing import Any, NoReturn, Optional, Sequence

import typer
from typer.core import TyperArgument, TyperCommand, TyperGroup

from mnistsum_cli import terminal
from mnistsum_cli.errors import MnistsumError, OutputClosed, OutputFailed
from mnistsum_cli.store.diskfiles import fault_text
from mnistsum_cli.torchrun import torchrun_rank


class _NamedArgument(TyperArgument):
    """An argument shown by its metavar alone, as `[IMAGE...]` and `RUN...` (Typer's own
    rendering adds the Python type, `<list[Path]>`, and writes `{RUN...}...` in the usage line)."""

    def display_type_rich(self, ctx: Any) -> Optional[str]:
        return None

    def get_usage_pieces(self, ctx: Any) -> list[str]:
        return [self.metavar if self.required else f"[{self.metavar}]"]


def _readable_placeholders(params: list) -> list:
    """Flags take no value: show none (not `<bool>`); an argument with a metavar shows that
    (its class swapped for _NamedArgument, which adds behaviour and no state)."""
    for param in params:
        if getattr(param, "is_flag", False):
            param.metavar = ""
        elif isinstance(param, TyperArgument) and param.metavar:
            param.__class__ = _NamedArgument
    return params


class Command(TyperCommand):
    def get_params(self, ctx: Any) -> list:
        return _readable_placeholders(super().get_params(ctx))

    def invoke(self, ctx: Any) -> Any:
        """Run the command; a closed stdout becomes OutputClosed, which Typer (unlike a
        BrokenPipeError, which it turns into exit code 1) lets through to CommandGroup.main."""
        try:
            return super().invoke(ctx)
        except BrokenPipeError:
            raise OutputClosed() from None


class CommandGroup(TyperGroup):
    def get_params(self, ctx: Any) -> list:
        return _readable_placeholders(super().get_params(ctx))

    def main(self, args: Optional[Sequence[str]] = None, prog_name: Optional[str] = None, **extra: Any) -> NoReturn:
        """Run the command line and exit: every failure is one line on stderr and an exit code.
        Output to stdout goes through _GuardedStdout, so that a full disk there is told apart
        from a failure to write an artifact."""
        _degrade_unencodable_output()
        stdout = sys.stdout
        sys.stdout = _GuardedStdout(stdout)
        try:
            try:
                self._run(args, prog_name, **extra)
            finally:
                sys.stdout.flush()  # what is still buffered fails here, while it can be reported
        except (OutputClosed, BrokenPipeError):
            _quiet_stdout()
            sys.exit(OutputClosed.exit_code)
        except OutputFailed as error:
            terminal.error(f"cannot write to standard output: {error}")
            _quiet_stdout()
            sys.exit(OutputFailed.exit_code)
        finally:
            sys.stdout = stdout

    def _run(self, args: Optional[Sequence[str]], prog_name: Optional[str], **extra: Any) -> NoReturn:
        """The command's own failures (MnistsumError), an OSError no stage put in its own words,
        and click's usage errors, each as one line and its exit code. Under torchrun only rank 0
        speaks: the ranks agree on errors."""
        quiet = (torchrun_rank() or 0) != 0
        try:
            code = super().main(args=args, prog_name=prog_name, standalone_mode=False, **extra)
        except MnistsumError as error:
            if not quiet:
                terminal.error(str(error))
            sys.exit(error.exit_code)
        except BrokenPipeError:
            raise  # the reader of stdout went away: main() exits quietly
        except OSError as error:  # the last resort for a file-system fault no stage put in its own words
            if not quiet:
                terminal.error(fault_text(None, error))
            sys.exit(1)
        except Exception as error:
            if not _is_usage_error(error):
                raise
            if quiet:
                sys.exit(error.exit_code)
            if type(error).__name__ == "NoArgsIsHelpError":
                error.show()
            else:
                context = getattr(error, "ctx", None)
                where = context.command_path if context is not None else "mnistsum"
                terminal.error(f"{error.format_message()} (see `{where} --help`)")
            sys.exit(error.exit_code)
        if code == 130 and not quiet:  # Typer turns Ctrl-C outside our handlers into exit code 130
            terminal.error("interrupted")
        sys.exit(code if isinstance(code, int) else 0)


def _is_usage_error(error: Exception) -> bool:
    """Click's (or Typer's vendored click's) usage errors, recognised without importing either."""
    return any(cls.__name__ == "ClickException" for cls in type(error).__mro__)


def _degrade_unencodable_output() -> None:
    """Characters the terminal's encoding lacks (the bars and arrows under LC_ALL=C, where
    Python writes ASCII) print as '?' rather than stop a command whose files are written."""
    for stream in (sys.stdout, sys.stderr):
        if getattr(stream, "errors", None) in ("strict", "surrogateescape") and hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="replace")


class _GuardedStdout:
    """sys.stdout whose write errors (`> /dev/full`) raise OutputFailed, so that they are told
    apart from errors writing the artifacts; a closed pipe stays a BrokenPipeError."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            raise
        except OSError as error:
            raise OutputFailed(error) from None

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            raise
        except OSError as error:
            raise OutputFailed(error) from None


def _quiet_stdout() -> None:
    """Point stdout at /dev/null, so that Python's final flush does not fail on the closed pipe."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


app = typer.Typer(
    cls=CommandGroup,
    name="mnistsum",
    help="Predict the digit in an MNIST image and its sum with a random number 0-9.\n\n"
    "Stages, in order: [bold]prepare[/] → [bold]train[/] → [bold]evaluate[/] → [bold]plot[/]; "
    "[bold]run[/] does all four, [bold]status[/] tells which are up to date.",
    epilog="Example: mnistsum run --mnist-dir ~/mnist --preset cpu --cpu  (or the four stages one by one)",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
