"""Command line: ``replicate {run,show,list}`` (or ``python -m replicate``); ``python -m replicate.render`` draws
the tables."""
from __future__ import annotations

import argparse
import sys

from .profiles import PROFILES

EPILOG = """examples:
  replicate run table5 --profile reduced --seeds 3
  replicate run tables/05_position_embedding.yaml --profile smoke
  replicate show table10 --profile paper
  torchrun --nproc_per_node 8 -m replicate run table5 --profile paper --data-root /data/imagenet

environment (runtime knobs; they change speed, not what a row means):
  REPLICATE_CPU_MATMUL=bf16|fp32   CPU matmul precision (default: bf16 on CPUs with AMX/AVX512-BF16, else fp32)
  REPLICATE_COMPILE=1|0            torch.compile the ViTs (default: on GPU only)
  REPLICATE_CHECKPOINT_EVERY=N     checkpoint interval in iterations (default: the profile's)
  REPLICATE_MALLOC=default         leave glibc's allocator settings alone on CPU
  OMP_WAIT_POLICY                  PASSIVE unless set (idle OpenMP threads sleep: no collapse on a busy machine)
"""


def build_parser() -> argparse.ArgumentParser:
    profiles = ", ".join(PROFILES)
    p = argparse.ArgumentParser(prog="replicate", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
                                description="MoCo v3 replication suite: run a study of the paper, or show its "
                                            "resolved settings.")
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="pretrain and evaluate every row of a study; results go to the results store",
                         description="Pretrain and evaluate every row of a study. A row whose stored result was "
                                     "made with the config the spec resolves to now is skipped; a row whose "
                                     "config changed is re-run (the log names the changed fields).")
    run.add_argument("table", help="tableN (1-11), or a path to a spec .yaml")
    run.add_argument("--profile", default="reduced", metavar="NAME",
                     help=f"scale, one of {profiles}: paper (ImageNet, GPUs), reduced (Fashion-MNIST, CPU minutes "
                          "per row), smoke (seconds per row). Default: reduced")
    run.add_argument("--seeds", type=int, default=1, help="seeds per row, 0..K-1. Default: 1")
    run.add_argument("--force", action="store_true", help="re-run rows that already have current results")
    run.add_argument("--keep-stale", action="store_true",
                     help="keep results whose config no longer matches the spec (the table marks them stale) "
                          "instead of re-running them")
    run.add_argument("--data-root", default=None, metavar="DIR",
                     help="dataset folder: ImageNet in ImageFolder layout (paper); Fashion-MNIST idx files "
                          "(reduced; else Debian's /usr/share/datasets/fashion-mnist or a torchvision download)")
    run.add_argument("--results", default=None, metavar="DIR", help="results root. Default: the repository's results/")
    run.add_argument("--no-render", action="store_true", help="do not print the rendered table afterwards")
    run.add_argument("--quiet", action="store_true", help="no progress bars (they are off anyway when stderr is "
                                                          "not a terminal)")
    show = sub.add_parser("show", help="print the resolved setting of every row at a profile (runs nothing)")
    show.add_argument("table", help="tableN or a spec path")
    show.add_argument("--profile", default="paper", metavar="NAME", help=f"one of {profiles}. Default: paper")
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
        if args.profile not in PROFILES:
            raise SpecError(f"unknown profile {args.profile!r}; choose one of: {', '.join(PROFILES)}")
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
                          progress=not args.quiet and sys.stderr.isatty(), keep_stale=args.keep_stale)
        from . import distributed as D

        if not args.no_render and D.is_main():
            from .render import render_table

            print(render_table(spec, store, write=True))
        return 0
    except (SpecError, DataError, ResultsError, CheckpointError, LaunchError, PrecisionError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        every = PROFILES[args.profile].checkpoint_every if getattr(args, "profile", None) in PROFILES else 0
        resume = (f"the current row resumes from its last checkpoint (every {every} iterations)" if every else
                  "the current row starts over (this profile does not checkpoint: its rows are short)")
        print(f"interrupted: finished rows are saved; {resume} on the next run", file=sys.stderr)
        return 130
    finally:
        shutdown()  # leave the torchrun process group cleanly (a no-op in a single process)


if __name__ == "__main__":
    sys.exit(main())
