"""The allocator setting that spares CPU training its per-step page faults (replicate/hostmem.py)."""
import json
import subprocess
import sys

import pytest

CODE = """
import json, resource, sys, torch
from replicate.hostmem import retain_freed_memory
applied = retain_freed_memory()
for _ in range(3):
    torch.ones(2048, 1024)  # 8 MiB: above glibc's default mmap threshold, below the raised one
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    torch.ones(2048, 1024)
print(json.dumps({"applied": applied, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
"""


def faults(env_value: str) -> dict:
    import os

    out = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, check=True,
                         env={**os.environ, "REPLICATE_MALLOC": env_value})
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_freed_tensors_are_recycled_not_refaulted():
    default, tuned = faults("default"), faults("")
    assert not default["applied"] and tuned["applied"]
    # each freshly mapped 8 MiB block faults in 2048 pages (glibc's adaptive threshold spares some of the 20)
    assert default["faults"] > 5 * 2048
    assert tuned["faults"] < 500
