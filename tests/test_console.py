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


def test_a_library_log_left_empty_is_removed_and_one_with_output_or_shared_is_kept(tmp_path):
    """A command whose libraries said nothing leaves no empty log behind; a log with their output stays, and so does
    a file the console did not create (a server's workers all write to the supervisor's)."""
    from crossport.console import quiet_console

    silent, spoken, shared = tmp_path / "silent.log", tmp_path / "spoken.log", tmp_path / "shared.log"
    shared.touch()
    for path in (silent, shared):
        with quiet_console(path, debug=False):
            pass
    with quiet_console(spoken, debug=False):
        os.write(2, b"a library's line\n")  # native code writes to descriptor 2, which the console points at the log
    assert not silent.exists()
    assert spoken.read_bytes() == b"a library's line\n"
    assert shared.exists()
