"""A crossport command runs with glibc's one heap (pipelines.memory.one_heap): it runs itself again, in its own place,
with the setting, unless the user chose their own."""

import os
import platform
import subprocess
import sys

import pytest

from pipelines.memory import ONE_HEAP
from tests.helpers import ROOT

pytestmark = [pytest.mark.slow,  # each starts a Python process
              pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the setting is glibc's")]
# what the command sees of the setting, and that it is still the process its parent started
REPORT = ("import os, sys; from pipelines.memory import one_heap; one_heap(); "
          "print(os.getpid(), os.environ.get('MALLOC_ARENA_MAX'), sys.argv[1:])")


def _run(env: dict) -> tuple[subprocess.Popen, str]:
    unset = {key: value for key, value in os.environ.items() if key not in ONE_HEAP}
    process = subprocess.Popen([sys.executable, "-c", REPORT, "--stage", "all"], cwd=ROOT, env={**unset, **env},
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 0, err
    return process, out.strip()


def test_a_command_runs_again_in_its_own_place_with_one_heap():
    process, out = _run({})
    assert out.split(maxsplit=2) == [str(process.pid), ONE_HEAP["MALLOC_ARENA_MAX"], "['--stage', 'all']"]


def test_a_users_own_allocator_setting_is_kept():
    process, out = _run({"MALLOC_ARENA_MAX": "4"})
    assert out.split(maxsplit=2) == [str(process.pid), "4", "['--stage', 'all']"]
