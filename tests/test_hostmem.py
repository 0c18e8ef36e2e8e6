"""The allocator setting that spares CPU training its per-step page faults (replicate/hostmem.py)."""
import json
import os
import subprocess
import sys

import pytest

# A step-like pattern: a set of activation-sized tensors (1.5-9 MiB) alive together, then freed, ten times over.
CODE = """
import json, resource, torch
from replicate.hostmem import retain_freed_memory
applied = retain_freed_memory()
sizes = [(256 * 17, n) for n in (128, 384, 512, 128, 512, 384)] * 4
faults = []
for _ in range(10):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    live = [torch.ones(*s) for s in sizes]
    del live
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"applied": applied, "faults": faults}))
"""


def run(env_value: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, check=True,
                         env={**os.environ, "REPLICATE_MALLOC": env_value})
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_freed_activations_are_recycled_not_refaulted():
    default, tuned = run("default"), run("")
    assert not default["applied"] and tuned["applied"]
    steady_default, steady_tuned = sum(default["faults"][5:]), sum(tuned["faults"][5:])
    # 135 MiB per round = ~35k pages: glibc's defaults fault most of them in again every round
    assert steady_default > 5 * 10_000
    assert steady_tuned < 5 * 100
