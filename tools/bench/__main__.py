"""Performance bench: how fast the suite pretrains, against the machine's peak and a plain reference.

``python -m tools.bench [--out results/bench/README.md] [--quick]``: on a CPU the CPU bench
(tools/bench/cpu.py), with a CUDA GPU the GPU bench (tools/bench/gpu.py). A markdown report goes to ``--out``
and the raw numbers to the same path with ``.json``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from .cpu import BenchPlan, render, run_bench
from .gpu import GpuPlan, render_gpu, run_gpu_bench


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m tools.bench", description=__doc__.splitlines()[0],
                                 epilog="With a CUDA GPU present the GPU bench (tools/bench/gpu.py) runs instead "
                                        "and writes results/bench/gpu.md.")
    ap.add_argument("--out", default=None,
                    help="markdown report (raw numbers: .json beside it); default results/bench/README.md on CPU, "
                         "results/bench/gpu.md on GPU")
    ap.add_argument("--quick", action="store_true", help="tiny sizes, for tests (< 30 s)")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    if device.type == "cuda":
        res = run_gpu_bench(GpuPlan.quick() if args.quick else GpuPlan(), device, log)
        text, out = render_gpu(res), Path(args.out or "results/bench/gpu.md")
    else:
        plan = BenchPlan.quick() if args.quick else BenchPlan()
        res = run_bench(plan, device, log)
        text, out = render(res), Path(args.out or "results/bench/README.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    out.with_suffix(".json").write_text(json.dumps(res, indent=1))
    print(f"wrote {out}", file=sys.stderr)
    return res


if __name__ == "__main__":
    main()
