"""Freed host memory stays in the process (experiments/allocator.py): a buffer allocated and freed
every step is not faulted back in page by page each time."""

import subprocess
import sys

import pytest

STEPS = r"""
import resource, sys
import numpy as np
from plutao.experiments import allocator
if sys.argv[1] == "keep":
    assert allocator.keep_freed_memory()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(2):  # (warm up)
    a = np.ones(8 << 20); del a
before = faults()
for _ in range(20):  # a "step": 64 MiB written, then freed
    a = np.ones(8 << 20); del a
print(faults() - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_freed_buffers_are_not_faulted_in_again():
    def faults(mode):
        out = subprocess.run([sys.executable, "-c", STEPS, mode], capture_output=True, text=True, check=True)
        return int(out.stdout.split()[-1])

    default, kept = faults("default"), faults("keep")
    # (glibc maps and unmaps each 64 MiB buffer, so each step faults its pages in again; kept, none do)
    assert default >= 20 and kept <= default // 10, (kept, default)
