"""``python -m pipelines.ui`` (``make ui``): the MLflow UI over crossport's local tracking store.

    python -m pipelines.ui [--store mlflow] [--host 127.0.0.1] [--port 5000]

The store folder must be new or empty, or a store MLflow made: ``mlflow.db`` (SQLite with
MLflow's tables), ``artifacts/`` and a README. Anything else is refused with one line: the
UI creates and migrates its database there, so it is never pointed at someone else's files.
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import sys
from pathlib import Path

from crossport.cli import PORT, summary_line
from crossport.errors import ConfigError
from crossport.files import foreign_entries

STORE = Path(__file__).resolve().parents[1] / "mlflow"
# the database (with SQLite's transient journal files), the artifact root, the checkout's README
STORE_FILES = frozenset({"mlflow.db", "mlflow.db-journal", "mlflow.db-wal", "mlflow.db-shm", "artifacts", "README.md"})


def check_store(store: Path) -> None:
    if store.exists() and not store.is_dir():
        raise ConfigError(f"--store {store} is a file, expected the tracking store's folder.",
                          hint="Pass a new folder, or the mlflow/ folder of a crossport checkout.")
    foreign = foreign_entries(store, STORE_FILES)
    if foreign:
        raise ConfigError(f"--store {store} holds files MLflow's store does not ({', '.join(foreign[:3])}); the UI "
                          "would create its database among them.", hint="Pass a new or empty --store.")
    database = store / "mlflow.db"
    if database.exists():
        try:
            with sqlite3.connect(f"{database.resolve().as_uri()}?mode=ro", uri=True) as connection:
                tables = {row[0] for row in connection.execute("select name from sqlite_master where type='table'")}
        except sqlite3.DatabaseError as error:
            raise ConfigError(f"{database} is not an SQLite database ({error}).",
                              hint="Move it away; the UI makes a new store.") from error
        if "alembic_version" not in tables or "runs" not in tables:
            raise ConfigError(f"{database} is an SQLite database without MLflow's tables.",
                              hint="Move it away; the UI makes a new store.")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.ui", allow_abbrev=False,
                                     description=summary_line(__doc__))
    parser.add_argument("--store", type=Path, default=STORE, help="the tracking store folder (default: mlflow/)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    parser.add_argument("--port", type=PORT, default=5000, help="port (default: 5000)")
    args = parser.parse_args(argv)
    from crossport.console import run_command

    return run_command(lambda: open_ui(args))


def open_ui(args: argparse.Namespace) -> int:
    """Replace this process with ``mlflow ui`` on the checked store."""
    check_store(args.store)
    store = args.store.resolve()
    mlflow = Path(sys.executable).parent / "mlflow"
    command = [str(mlflow), "ui", "--host", args.host, "--port", str(args.port),
               "--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}",
               "--default-artifact-root", str(store / "artifacts")]
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    # MLflow 3's server also starts job runners (huey consumers, one process each) for GenAI evaluation jobs, which
    # crossport never submits: off unless the user turns them on.
    os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    sys.stdout.write(f"MLflow UI on http://{args.host}:{args.port}/#/models (registered versions; a run's summary "
                     "prints its version page). MLflow 3.17 opens in its GenAI view: the sidebar's 'Model training' "
                     "switch shows runs, metrics and datasets, and the browser remembers it.\n")
    sys.stdout.flush()
    os.execv(command[0], command)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
