"""The console's progress bars: on a terminal only, with crossport's log lines printed above them; where a command's
libraries' log goes."""

import io
import logging
import os
import tempfile
from pathlib import Path

from crossport.console import BarSafeHandler, progress


def test_log_lines_print_above_a_running_bar_not_through_it():
    from tqdm import tqdm

    stream = io.StringIO()
    bar = tqdm(total=10, file=stream, disable=False, leave=False, desc="epoch 1/3")  # drawn as on a terminal
    bar.update(3)
    handler = BarSafeHandler(stream)
    logger = logging.getLogger("crossport.tests.console")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("a line of ours")
    finally:
        logger.removeHandler(handler)
    bar.update(3)
    bar.close()
    before, after = stream.getvalue().split("a line of ours", 1)
    assert before.rsplit("\r", 1)[-1].strip() == ""  # the bar was cleared first: the line starts on its own
    assert after.startswith("\n") and "epoch 1/3" in after  # and the bar is drawn again below it


def test_no_bars_when_the_output_is_not_a_terminal():
    bar = progress(range(3), desc="validate")  # pytest's captured stderr is not a terminal, nor is CI's log
    assert bar.disable and list(bar) == [0, 1, 2]


def test_a_commands_library_log_goes_to_the_temporary_folder_the_session_keeps():
    """crossport.console.command_log writes to the system's temporary folder; the suite points that folder into its
    own session folder (tests/conftest.py), so the hundreds of served and checked processes a run starts leave no
    file in /tmp."""
    from crossport.console import command_log

    session = Path(os.environ["CROSSPORT_TEST_SESSION"]).resolve()
    assert Path(tempfile.gettempdir()).resolve().is_relative_to(session)
    assert command_log("serve").resolve().is_relative_to(session)
    assert Path(os.environ["TMPDIR"]).resolve().is_relative_to(session)  # what the processes it starts inherit
