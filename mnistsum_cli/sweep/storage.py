"""The study's Optuna storage: opening it (its tables, heartbeats and the retry of a stale trial),
its errors as one line naming it, and finding or loading a study in it. The one module of the
sweep that talks to the database; everything else goes through it.
"""

from __future__ import annotations

import time
import warnings
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Iterator, Optional

from mnistsum_cli.errors import BadOption, MnistsumError, first_line

if TYPE_CHECKING:
    import optuna

DEFAULT_HEARTBEAT = 10  # seconds between a running trial's heartbeats
GRACE_HEARTBEATS = 3  # a trial silent this many heartbeats long is failed (and retried once)
SQLITE_LOCK_WAIT = 60.0  # seconds SQLite waits for another process's write: heartbeats on a busy machine wait too
TABLE_ATTEMPTS = 3  # tries at making Optuna's tables (see open_storage)


def shown_url(url: str) -> str:
    """The storage URL for messages: its password hidden."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url


def quiet_optuna() -> None:
    """Optuna logs every trial at INFO (a failed one at WARNING, with its traceback) and warns
    that heartbeats are experimental: the sweep prints its own lines."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


@contextmanager
def storage_errors(url: str) -> Iterator[None]:
    """A storage that cannot be reached, refuses us or is locked: one line naming it."""
    import optuna
    import sqlalchemy.exc

    try:
        yield
    except (sqlalchemy.exc.SQLAlchemyError, optuna.exceptions.StorageInternalError) as error:
        raise MnistsumError(f"storage {shown_url(url)}: {storage_cause(error)}") from None
    except ImportError as error:  # the URL's database driver is not installed
        raise MnistsumError(f"storage {shown_url(url)}: {first_line(error)}") from None


def storage_cause(error: BaseException) -> str:
    """The database's own words under Optuna's and SQLAlchemy's wrappers ('database is locked')."""
    while getattr(error, "orig", None) or error.__cause__:
        error = getattr(error, "orig", None) or error.__cause__
    return first_line(error)


def open_storage(url: str, heartbeat: int = DEFAULT_HEARTBEAT, create: bool = True) -> optuna.storages.RDBStorage:
    """The study's RDBStorage with heartbeats: a trial whose process stops beating is failed by the
    next worker that looks, and retried once. `create`: make Optuna's tables when missing. Two
    processes making the tables of an empty database at once collide (PostgreSQL: a duplicate
    key); the loser tries again and finds them made."""
    import optuna
    import sqlalchemy.exc

    quiet_optuna()
    attempts = 0
    while True:
        try:
            with storage_errors(url):
                return optuna.storages.RDBStorage(
                    url,
                    engine_kwargs={"connect_args": {"timeout": SQLITE_LOCK_WAIT}} if url.startswith("sqlite") else {},
                    skip_table_creation=not create,
                    heartbeat_interval=heartbeat,
                    grace_period=GRACE_HEARTBEATS * heartbeat,
                    **_retry_once(),
                )
        except MnistsumError as error:
            attempts += 1
            collided = isinstance(error.__context__, (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError))
            if not (create and collided and attempts < TABLE_ATTEMPTS):
                raise
            time.sleep(0.5)
        except (sqlalchemy.exc.ArgumentError, ValueError, optuna.exceptions.OptunaError) as error:
            raise BadOption(f"--storage {shown_url(url)}: {first_line(error)}") from None


def _retry_once() -> dict[str, Any]:
    """RDBStorage's argument that retries a stale trial once: Optuna 4.9 renamed it (the old name
    remains for Optuna < 4.9, which Python 3.9 gets)."""
    from optuna import storages

    if hasattr(storages, "RetryHeartbeatStaleTrialCallback"):
        return {"heartbeat_stale_trial_callback": storages.RetryHeartbeatStaleTrialCallback(max_retry=1)}
    return {"failed_trial_callback": storages.RetryFailedTrialCallback(max_retry=1)}


def retried_number(trial: optuna.trial.FrozenTrial) -> Optional[int]:
    """The number of the trial this one retries, or None."""
    from optuna import storages

    retry = getattr(storages, "RetryHeartbeatStaleTrialCallback", None) or storages.RetryFailedTrialCallback
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "experimental" since Optuna 2.8
        return retry.retried_trial_number(trial)


def find_study(storage: optuna.storages.RDBStorage, name: str, url: str) -> Optional[int]:
    """The study's id in the storage, or None when it holds none of that name."""
    with storage_errors(url):
        try:
            return storage.get_study_id_from_name(name)
        except KeyError:
            return None


def load_study(url: str, name: str, heartbeat: int = DEFAULT_HEARTBEAT) -> optuna.Study:
    """An existing study, read only (no tables made): one line when there is none."""
    import optuna

    storage = open_storage(url, heartbeat, create=False)
    if find_study(storage, name, url) is None:
        raise MnistsumError(f"no study {name!r} in {shown_url(url)}: run `mnistsum sweep --study {name}` first")
    with storage_errors(url):
        return optuna.load_study(study_name=name, storage=storage)
