"""Tell an Optuna trial how its training goes, epoch by epoch, and stop it when the pruner says
it is hopeless. A train.Reporter: train() calls epoch_end after the epoch's commit, so a pruned
trial's folder keeps every epoch it finished (and model.safetensors its best one)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import optuna

OBJECTIVE_METRIC = "val_sum_accuracy"  # what a sweep maximises, never a test figure


class PruningReporter:
    """Reports each epoch's val sum accuracy to `trial`; raises optuna.TrialPruned at the end of
    an epoch (never the last: a finished trial is complete) when the trial's pruner says so."""

    def __init__(self, trial: optuna.Trial) -> None:
        self.trial = trial
        self.epochs = 0

    def epoch_start(self, epoch: int, epochs: int, steps: int, batch_size: int) -> None:
        self.epochs = epochs

    def step(self) -> None:
        pass

    def epoch_end(self, record: dict[str, Any]) -> None:
        import optuna

        self.trial.report(record[OBJECTIVE_METRIC], record["epoch"])
        if record["epoch"] < self.epochs and self.trial.should_prune():
            raise optuna.TrialPruned(f"pruned after epoch {record['epoch']}")
