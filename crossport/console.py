"""A quiet console: crossport's own lines on the terminal, everything the frameworks print in a log file.

TensorFlow, LiteRT, absl, ONNX Runtime and MLflow write to the process's file descriptors
1 and 2 from native code (``oneDNN custom operations are on``, ``failed call to cuInit``,
``fully_quantize: 0 ...``), through Python's ``warnings`` and through their own loggers.
:class:`QuietConsole` points descriptors 1 and 2 at the log file for its duration, so all
of that lands there, while Python's ``sys.stdout`` / ``sys.stderr`` — crossport's log lines,
progress bars, the summary, the one-line errors — keep writing to the terminal. Every
line, crossport's included, also goes to the log file. ``--debug`` leaves the console
alone.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

LOG_NAME = "run.log"
OUR_PACKAGES = ("crossport", "training", "export", "serving", "translation", "pipelines")


class BarSafeHandler(logging.StreamHandler):
    """Writes each record with ``tqdm.write``: on a terminal it prints above a running progress bar, not through
    it (elsewhere there are no bars and it is a plain write)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # logging's contract: a failing handler reports, never raises
            self.handleError(record)


def progress(iterable=None, *, total: int | None = None, desc: str = "", unit: str = "it"):
    """A progress bar on a terminal only (tqdm's own check: none when stderr is redirected, as in CI), erased when
    done; crossport's log lines print above it."""
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=None, leave=False)


def configure_logging(debug: bool) -> None:
    """Our INFO lines; the libraries' warnings only (their INFO chatter drowns the run); everything with --debug."""
    handler = BarSafeHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(message)s", datefmt="%H:%M:%S"))
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING, handlers=[handler])
    for name in OUR_PACKAGES:
        logging.getLogger(name).setLevel(logging.DEBUG if debug else logging.INFO)
    if not debug:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def run_command(body: Callable[[], int], *, debug: bool = False, log_file: Path | None = None) -> int:
    """Every crossport command's scaffold, after its flags are parsed: logging configured (:func:`configure_logging`),
    ``body`` run under the quiet console when ``log_file`` names its file, a :class:`CrossportError` ended as one
    line and its exit code (with the traceback under ``--debug``), Ctrl-C as exit 130."""
    from crossport.errors import CrossportError, report
    from crossport.frameworks import own_the_process

    configure_logging(debug)
    own_the_process()  # TensorFlow's import goes without Keras' extras (1.4 s), full collections seldom (1 s)
    try:
        if log_file is None:
            return body()
        with quiet_console(log_file, debug):
            return body()
    except CrossportError as error:
        return report(error, debug=debug)
    except KeyboardInterrupt:
        sys.stderr.write("crossport: interrupted\n")
        return 130


def command_log(command: str) -> Path:
    """Where a command with no run directory of its own sends the libraries' output: ``crossport-<command>-<pid>.log``
    in the system's temporary folder."""
    import tempfile

    return Path(tempfile.gettempdir()) / f"crossport-{command}-{os.getpid()}.log"


def quiet_console(log_path: Path, debug: bool) -> QuietConsole:
    """The console every crossport command runs under: quiet unless ``--debug``."""
    return QuietConsole(log_path, OUR_PACKAGES, enabled=not debug)


class QuietConsole:
    def __init__(self, log_path: Path, packages: tuple[str, ...], *, enabled: bool = True) -> None:
        self.log_path = Path(log_path)
        self.packages = packages
        self.enabled = enabled
        self._saved: tuple[int, int] | None = None

    def __enter__(self) -> QuietConsole:
        if not self.enabled:
            return self
        sys.stdout.flush()
        sys.stderr.flush()
        self._created = not self.log_path.exists()  # another process's file (a server's workers share one) stays
        self._log = open(self.log_path, "ab", buffering=0)
        self._saved = (os.dup(1), os.dup(2))
        self._streams = (sys.stdout, sys.stderr)
        # Python's own streams keep the terminal: they write to copies of the original descriptors
        terminal_out = io.TextIOWrapper(io.FileIO(os.dup(self._saved[0]), "w"), line_buffering=True)
        terminal_err = io.TextIOWrapper(io.FileIO(os.dup(self._saved[1]), "w"), line_buffering=True)
        os.dup2(self._log.fileno(), 1)
        os.dup2(self._log.fileno(), 2)
        sys.stdout, sys.stderr = terminal_out, terminal_err
        # logging: the root handler writes to the original sys.stderr, whose descriptor 2 is now the log, so
        # library loggers and warnings land there; crossport's loggers also get a handler on the terminal
        logging.captureWarnings(True)
        root = logging.getLogger()
        template = next((h for h in root.handlers if isinstance(h, logging.StreamHandler)), None)
        self._handler = BarSafeHandler(terminal_err)
        if template is not None and template.formatter is not None:
            self._handler.setFormatter(template.formatter)
        for name in self.packages:
            logging.getLogger(name).addHandler(self._handler)
        return self

    def __exit__(self, *exc) -> None:
        if self._saved is None:
            return
        sys.stdout.flush()
        sys.stderr.flush()
        for name in self.packages:
            logging.getLogger(name).removeHandler(self._handler)
        os.dup2(self._saved[0], 1)
        os.dup2(self._saved[1], 2)
        for fd in self._saved:
            os.close(fd)
        terminal = (sys.stdout, sys.stderr)
        sys.stdout, sys.stderr = self._streams
        for stream in terminal:
            stream.close()
        logging.captureWarnings(False)
        self._log.close()
        self._saved = None
        with contextlib.suppress(OSError):  # nothing the libraries said: no empty file of ours left (in /tmp, often)
            if self._created and self.log_path.stat().st_size == 0:
                self.log_path.unlink()
