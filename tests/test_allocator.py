"""aenet_dist.allocator: the train command keeps freed memory for reuse (glibc's mallopt)."""

import subprocess
import sys

import pytest

CHECK = """
import ctypes, sys
from aenet_dist.allocator import keep_freed_memory
print(keep_freed_memory())
"""


def _run(env_value):
    import os

    env = {k: v for k, v in os.environ.items() if k != "AENET_DIST_MALLOC"}
    if env_value is not None:
        env["AENET_DIST_MALLOC"] = env_value
    return subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, env=env, check=True).stdout.strip()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_memory_is_kept_unless_the_user_says_system():
    import platform

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("not glibc")
    assert _run(None) == "True"
    assert _run("system") == "False"
    assert _run("SYSTEM") == "False"
