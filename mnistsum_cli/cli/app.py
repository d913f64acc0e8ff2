"""The `mnistsum` command line: the app with every command, in the order --help lists them, and
its entry point. The commands live by concern in stages.py (the pipeline), model.py (predict,
export, serve) and experiments.py (sweep, runs, compare); commands.py turns their outcome into
an exit code."""

from typing import Annotated, List, Optional

import typer

from mnistsum_cli import __version__
from mnistsum_cli.cli import experiments, model, stages
from mnistsum_cli.cli.commands import app
from mnistsum_cli.errors import BadOption
from mnistsum_cli.torchrun import torchrun_rank

COMMAND_MODULES = (stages, model, experiments)  # imported for their commands, which register on `app`
# --help lists the commands in this order: the stages as they run, the model's uses, then many runs
HELP_ORDER = (
    "prepare",
    "train",
    "evaluate",
    "plot",
    "predict",
    "export",
    "serve",
    "run",
    "status",
    "sweep",
    "runs",
    "compare",
)
app.registered_commands.sort(key=lambda command: HELP_ORDER.index(command.name or command.callback.__name__))


def _version(value: bool) -> None:
    if value:
        typer.echo(f"mnistsum {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    context: typer.Context,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Predict the digit in an MNIST image and its sum with a random number 0-9."""
    if torchrun_rank() is not None and context.invoked_subcommand != "train":
        raise BadOption(
            f"`mnistsum {context.invoked_subcommand}` runs in one process: start it without torchrun (only `train` runs under torchrun)"
        )


def main(argv: Optional[List[str]] = None) -> None:
    """Run the CLI and exit with its code (commands.CommandGroup.main)."""
    typer.main.get_command(app).main(args=argv, prog_name="mnistsum")
