"""A study's plots, with Optuna's matplotlib visualisations, into the study folder (one store
commit): the optimisation history, the settings' importances, a parallel-coordinate plot of the
settings against the value, and with two objectives the Pareto front of val sum accuracy
against training seconds."""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from mnistsum_cli.store.transactions import commit
from mnistsum_cli.store.writes import write_file

if TYPE_CHECKING:
    import optuna

ACCURACY, SECONDS = "val sum accuracy", "training seconds"


def _importance_evaluator() -> Any:
    """PED-ANOVA: Optuna's own (the default fANOVA needs scikit-learn, which mnistsum does not)."""
    from optuna.importance import PedAnovaImportanceEvaluator

    return PedAnovaImportanceEvaluator()


def study_plots(study: optuna.Study) -> dict[str, Callable[[], Any]]:
    """File name → a function drawing it (each returns matplotlib Axes); only the plots the study
    has enough trials for."""
    from optuna.trial import TrialState
    from optuna.visualization import matplotlib as views

    complete = [trial for trial in study.get_trials(deepcopy=False) if trial.state == TrialState.COMPLETE]
    varied = {name for trial in complete for name in trial.params}
    two = len(study.directions) == 2
    first = {"target": lambda trial: trial.values[0], "target_name": ACCURACY} if two else {"target_name": ACCURACY}
    plots: dict[str, Callable[[], Any]] = {}
    if not complete:
        return plots
    plots["history.png"] = lambda: views.plot_optimization_history(study, **first)
    if len(complete) >= 2 and varied:
        plots["parallel.png"] = lambda: views.plot_parallel_coordinate(study, **first)
        plots["importance.png"] = lambda: views.plot_param_importances(
            study, evaluator=_importance_evaluator(), **first
        )
    if two:
        plots["pareto.png"] = lambda: views.plot_pareto_front(study, target_names=[ACCURACY, SECONDS])
    return plots


def draw_study(study: optuna.Study, folder: Path) -> list[Path]:
    """Draw every plot the study allows into folder/plots/ in one commit; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images: dict[str, bytes] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Optuna marks its matplotlib views experimental
        for name, draw in study_plots(study).items():
            axes = draw()
            figure = (axes.flat[0] if hasattr(axes, "flat") else axes).get_figure()
            figure.set_size_inches(9, 5.5)
            figure.tight_layout()
            buffer = io.BytesIO()
            figure.savefig(buffer, format="png", dpi=110)
            plt.close(figure)
            images[name] = buffer.getvalue()
    plots = folder / "plots"
    with commit(folder, "sweep", "--artifacts") as change:
        staging = change.folder_of(plots)  # the plots replace the last set as a whole, as `plot`'s do
        for name, data in images.items():
            write_file(staging / name, data)
    return [plots / name for name in images]
