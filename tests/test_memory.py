"""glibc malloc tuning for device servers: each case runs in a fresh interpreter, since the
settings are process-wide and glibc's mmap threshold remembers what was freed before."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from nonn.runtime.memory import release_free_memory, tune_malloc

glibc_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")

# Touches and frees a 4 MiB buffer (which makes glibc's adaptive mmap threshold jump to 4 MiB),
# then a 2 MiB one, and prints how much private memory (KiB) that left behind.
RATCHET = """
import ctypes, sys
from nonn.runtime.memory import tune_malloc
if sys.argv[1] == "tuned":
    assert tune_malloc()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]

def anon_kib():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1])

def touch_and_free(size):
    p = libc.malloc(size)
    ctypes.memset(p, 1, size)
    libc.free(p)

before = anon_kib()
touch_and_free(4 << 20)
touch_and_free(2 << 20)
print(anon_kib() - before)
"""


def _kib_left_behind(mode: str, **env: str) -> int:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run(
        [sys.executable, "-c", RATCHET, mode], capture_output=True, text=True, check=True, env={**environ, **env}
    )
    return int(out.stdout.strip())


@glibc_only
def test_fixed_mmap_threshold_returns_freed_buffers():
    # glibc's default keeps the 2 MiB in its heap after free; with the threshold fixed the
    # buffer is mmap'd and unmapped on free, so the process's private memory comes back.
    assert _kib_left_behind("default") >= 1024
    assert _kib_left_behind("tuned") < 256


@glibc_only
def test_tune_malloc_leaves_a_threshold_set_in_the_environment_alone():
    # The user's 64 MiB threshold wins: both buffers come from the heap, which keeps them.
    big = str(64 << 20)
    assert _kib_left_behind("tuned", MALLOC_MMAP_THRESHOLD_=big, MALLOC_TRIM_THRESHOLD_=big) >= 1024


@glibc_only
def test_tune_and_release_report_success_on_glibc():
    assert tune_malloc(arenas=None, mmap_threshold=None) is True  # nothing asked, nothing failed
    assert isinstance(release_free_memory(), bool)


@pytest.mark.parametrize("bad", [{"arenas": 0}, {"mmap_threshold": -1}, {"arenas": 1.5}])
def test_tune_malloc_refuses_bad_values(bad):
    with pytest.raises(ValueError, match="must be a positive int or None"):
        tune_malloc(**bad)
