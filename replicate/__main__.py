"""Command line: ``python -m replicate {run,show,list}``; ``python -m replicate.render`` draws the tables."""
from __future__ import annotations

import argparse
import sys

from .profiles import PROFILES

EPILOG = """examples:
  python -m replicate run table5 --profile reduced --seeds 3
  python -m replicate run tables/05_position_embedding.yaml --profile smoke
  python -m replicate show table10 --profile paper
  torchrun --nproc_per_node 8 -m replicate run table5 --profile paper --data-root /data/imagenet

environment (runtime knobs; they change speed, not what a row means):
  REPLICATE_CPU_MATMUL=bf16|fp32   CPU matmul precision (default: bf16 on CPUs with AMX/AVX512-BF16, else fp32)
  REPLICATE_COMPILE=1|0            torch.compile the ViTs (default: on GPU only)
  REPLICATE_CHECKPOINT_EVERY=N     checkpoint interval in iterations (default: the profile's)
  REPLICATE_MALLOC=default         leave glibc's allocator settings alone on CPU
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m replicate", epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                description="MoCo v3 replication suite: run a study of the paper, or show its "
                                            "resolved settings.")
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="pretrain and evaluate every row of a study; results go to the results store",
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    run.add_argument("table", help="tableN (1-11), or a path to a spec .yaml")
    run.add_argument("--profile", default="reduced", choices=sorted(PROFILES),
                     help="scale: paper (ImageNet, GPUs), reduced (Fashion-MNIST, CPU minutes/row), smoke (seconds)")
    run.add_argument("--seeds", type=int, default=1, help="number of seeds per row (seeds 0..K-1)")
    run.add_argument("--force", action="store_true", help="re-run rows that already have results")
    run.add_argument("--data-root", default=None,
                     help="dataset folder (ImageNet in ImageFolder layout for paper; Fashion-MNIST idx files "
                          "for reduced; default: Debian's /usr/share/datasets or a torchvision download)")
    run.add_argument("--results", default=None, help="results root (default: the repo's results/)")
    run.add_argument("--no-render", action="store_true", help="do not print the rendered table afterwards")
    run.add_argument("--quiet", action="store_true", help="no progress bars")
    show = sub.add_parser("show", help="print the resolved setting of every row at a profile (runs nothing)")
    show.add_argument("table", help="tableN or a spec path")
    show.add_argument("--profile", default="paper", choices=sorted(PROFILES))
    sub.add_parser("list", help="list the studies")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .checkpoint import CheckpointError
    from .data import DataError
    from .distributed import LaunchError, shutdown
    from .precision import PrecisionError, cpu_matmul_precision
    from .results import ResultsError
    from .spec import SpecError, all_specs, find_spec, load_spec

    try:
        if args.command == "list":
            for s in all_specs():
                print(f"{s.key:8s} {s.title:38s} {s.paper_ref}")
            return 0
        spec = load_spec(find_spec(args.table))
        if args.command == "show":
            from .show import show_table

            print(show_table(spec, args.profile))
            return 0
        if args.seeds < 1:
            raise SpecError(f"--seeds must be at least 1 (got {args.seeds})")
        cpu_matmul_precision()  # a mistyped $REPLICATE_CPU_MATMUL fails here, before any row runs
        from .runner import run_table

        store = run_table(spec, args.profile, args.seeds, args.force, args.data_root, args.results,
                          progress=not args.quiet)
        from . import distributed as D

        if not args.no_render and D.is_main():
            from .render import render_table

            print(render_table(spec, store, write=True))
        return 0
    except (SpecError, DataError, ResultsError, CheckpointError, LaunchError, PrecisionError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished rows are saved; checkpoints let the current row resume", file=sys.stderr)
        return 130
    finally:
        shutdown()  # leave the torchrun process group cleanly (a no-op in a single process)


if __name__ == "__main__":
    sys.exit(main())
