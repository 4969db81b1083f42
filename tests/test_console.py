"""The console's progress bars: on a terminal only, with crossport's log lines printed above them."""

import io
import logging

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
