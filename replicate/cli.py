"""Command line: ``replicate {run,show,list,export,evaluate}`` (or ``python -m replicate``); ``python -m
replicate.report.render`` draws the tables."""
from __future__ import annotations

import argparse
import sys
import textwrap

from replicate.study.profiles import PROFILES, get_profile

EPILOG = """examples:
  replicate run table5 --profile reduced --seeds 3
  replicate run tables/05_position_embedding.yaml --profile smoke
  replicate run table10 --profile reduced --seeds 3 --rows vit_bn_h,vit_bn_l_p7
  replicate show table10 --profile paper
  torchrun --nproc_per_node 8 -m replicate run table5 --profile paper --data-root /data/imagenet
  replicate export table5 sincos --profile smoke --format timm -o sincos.pth
  replicate evaluate vit-b-300ep.pth.tar --profile paper --data-root /data/imagenet

environment (runtime knobs; they change speed, not what a row means):
  REPLICATE_CPU_MATMUL=bf16|fp32   CPU matmul precision (default fp32 on every CPU; bf16, for CPUs with AMX or
                                   AVX512-BF16, writes to results/cpu-bf16/ unless --results is given)
  REPLICATE_COMPILE=1|0            torch.compile the ViTs (default: on GPU only)
  REPLICATE_CHECKPOINT_EVERY=N     checkpoint interval in iterations (default: the profile's)
  REPLICATE_PROBE_BF16=1|0         paper linear probe's backbone forward in bf16 on GPU (default 0: fp32, as official)
  REPLICATE_PEER_TIMEOUT=SECONDS   torchrun: a stopped peer ends the run after this long (default: torch's, 30 min)
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
    run.add_argument("table", help="tableN (`replicate list` lists them), or a path to a spec .yaml")
    run.add_argument("--profile", default="reduced", metavar="NAME",
                     help=f"scale, one of {profiles}: paper (ImageNet, GPUs), reduced (Fashion-MNIST, CPU minutes "
                          "per row), smoke (seconds per row). Default: reduced")
    run.add_argument("--seeds", type=int, default=1, help="seeds per row, 0..K-1. Default: 1")
    run.add_argument("--rows", type=lambda v: [name for name in v.split(",") if name], metavar="ROW[,ROW...]",
                     help="run only these rows, comma-separated (names as `replicate show` lists them), e.g. to "
                          "re-run one with --force. Default: every row")
    run.add_argument("--force", action="store_true", help="re-run rows that already have current results")
    run.add_argument("--keep-stale", action="store_true",
                     help="keep results whose config no longer matches the spec (the table marks them stale) "
                          "instead of re-running them")
    run.add_argument("--data-root", default=None, metavar="DIR",
                     help="dataset folder: ImageNet in ImageFolder layout (paper); Fashion-MNIST idx files "
                          "(reduced; else Debian's /usr/share/datasets/fashion-mnist or a torchvision download)")
    run.add_argument("--results", default=None, metavar="DIR",
                     help="results root. Default: the repository's results/ (results/cpu-bf16/ with "
                          "REPLICATE_CPU_MATMUL=bf16 on CPU); `python -m replicate.render` then defaults to it")
    run.add_argument("--no-render", action="store_true", help="do not print the rendered table afterwards")
    run.add_argument("--quiet", action="store_true", help="no progress output (a bar on a terminal; in a log file, "
                                                          "a line at every tenth of a run)")
    show = sub.add_parser("show", help="print the resolved setting of every row at a profile (runs nothing)")
    show.add_argument("table", help="tableN or a spec path")
    show.add_argument("--profile", default="paper", metavar="NAME", help=f"one of {profiles}. Default: paper")
    sub.add_parser("list", help="list the studies: the names `run` takes, titles, where the paper reports them")
    add_export_parser(sub, profiles)
    add_evaluate_parser(sub, profiles)
    return p


EXPORT_EPILOG = """examples:
  replicate export table5 sincos --profile reduced --format timm -o sincos.pth
  replicate export table10 vit_small --profile paper --seed 1 --format moco-v3 -o vit_small.pth.tar

timm:    model = replicate.core.model.build_vit(cfg); model.load_state_dict(torch.load("sincos.pth")), or the
         timm.create_model(...) call the command prints (ViT-BN rows: build_vit only)
moco-v3: the official main_moco.py layout; the official main_lincls.py --pretrained reads it. Only the base
         encoder's backbone is exported: the projector/predictor heads and the momentum encoder are not kept.
"""

EVALUATE_EPILOG = """examples:
  replicate evaluate vit-b-300ep.pth.tar --profile paper --data-root /data/imagenet
  torchrun --nproc_per_node 8 -m replicate evaluate vit-b-300ep.pth.tar --profile paper --data-root /data/imagenet
  replicate evaluate sincos.pth --profile reduced --row table5:sincos
  replicate evaluate results/reduced/05_position_embedding/sincos/seed0.backbone.pt

the model: the config stored in the file (a row's seed<K>.backbone.pt), else --row TABLE:ROW resolved at the
profile, else the paper's default setting with --arch (vit_base) resolved at the profile. The checkpoint must fit
it exactly; otherwise one line names the first missing, unexpected or mis-shaped key.
"""


def add_export_parser(sub, profiles: str) -> None:
    from replicate.study.export import EXPORT_FORMATS

    export = sub.add_parser(
        "export", help="write a finished row's backbone as a timm state dict or an official moco-v3 checkpoint",
        description=textwrap.fill(
            "Export the backbone a finished pretraining row kept (<results>/<profile>/<spec file name>/<row>/"
            "seed<K>.backbone.pt) as a plain timm VisionTransformer state dict (num_classes=0, no head) or in the "
            "official facebookresearch/moco-v3 layout (module.base_encoder.* keys; the heads and the momentum "
            "encoder are not exported).", 116),
        epilog=EXPORT_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    export.add_argument("table", help="tableN (`replicate list` lists them), or a path to a spec .yaml")
    export.add_argument("row", help="the row's name (replicate show TABLE lists them)")
    export.add_argument("--profile", default="reduced", metavar="NAME", help=f"one of {profiles}. Default: reduced")
    export.add_argument("--seed", type=int, default=0, help="which seed's backbone. Default: 0")
    export.add_argument("--format", required=True, choices=EXPORT_FORMATS, help="timm or moco-v3")
    export.add_argument("-o", "--output", required=True, metavar="FILE", help="where to write the export")
    export.add_argument("--results", default=None, metavar="DIR",
                        help="results root. Default: where `run` writes (results/, or results/cpu-bf16/ with "
                             "REPLICATE_CPU_MATMUL=bf16)")


def add_evaluate_parser(sub, profiles: str) -> None:
    from replicate.study.profiles import PAPER_ARCHS

    evaluate = sub.add_parser(
        "evaluate", help="score a checkpoint (official moco-v3, timm ViT, or a row's backbone) with a profile's "
                         "protocols",
        description=textwrap.fill(
            "Evaluate a ViT checkpoint with a profile's protocols: kNN and linear probe on frozen features (reduced, "
            "smoke) or kNN and the paper's linear probe (paper). Accepts the official moco-v3 checkpoint "
            "(module.base_encoder.*; heads, momentum encoder and predictor dropped), a timm ViT state dict (plain "
            "or under state_dict/model) or a row's seed<K>.backbone.pt. Prints the metrics; rank 0 writes "
            "<results>/<profile>/evaluations/<checkpoint name>.<sha256[:8]>.json.", 116),
        epilog=EVALUATE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    evaluate.add_argument("checkpoint", help="the checkpoint file")
    evaluate.add_argument("--profile", default=None, metavar="NAME",
                          help=f"one of {profiles}. Default: the profile stored in the file, else paper")
    evaluate.add_argument("--arch", default=None, choices=list(PAPER_ARCHS),
                          help="the paper's architecture when neither the file nor --row gives one. Default: "
                               "vit_base")
    evaluate.add_argument("--row", default=None, metavar="TABLE:ROW",
                          help="build the model of this spec row at the profile (e.g. table5:learned)")
    evaluate.add_argument("--seed", type=int, default=0,
                          help="seed of the linear probe (with --row or --arch). Default: 0")
    evaluate.add_argument("--data-root", default=None, metavar="DIR", help="dataset folder, as for `run`")
    evaluate.add_argument("--results", default=None, metavar="DIR",
                          help="results root the evaluation record goes to. Default: the repository's results/")
    evaluate.add_argument("--quiet", action="store_true", help="no progress output (bars, or log lines)")
    evaluate.add_argument("--trust-checkpoint", action="store_true",
                          help="unpickle a checkpoint that holds Python objects beyond tensors (refused by default: "
                               "unpickling can run code); only for a file from a source you trust")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Lazy imports in this module, kept on purpose: each command imports only what it runs. Importing the runner,
    # renderer, export and evaluate up front makes `replicate --help`/`list`/`show` start in ~10 s instead of
    # ~4 s (measured on the 2-core VM under load, `python -c "import replicate.cli"` against importing them all).
    from replicate.core.data import DataError
    from replicate.core.distributed import LaunchError, peer_failure, shutdown
    from replicate.runtime.atomic import WriteError
    from replicate.runtime.checkpoint import CheckpointError
    from replicate.runtime.precision import PrecisionError, check_cpu_precision
    from replicate.study.evaluate import CheckpointLoadError
    from replicate.study.results import ResultsError
    from replicate.study.spec import SpecError, all_specs, find_spec, load_spec

    try:
        if args.command == "list":
            from tabulate import tabulate

            print(tabulate([(s.name, s.title, s.paper_ref) for s in all_specs()], ["study", "title", "paper"],
                           tablefmt="simple"))
            return 0
        if args.profile is not None and args.profile not in PROFILES:
            raise SpecError(f"unknown profile {args.profile!r}; choose one of: {', '.join(PROFILES)}")
        if args.command == "evaluate":
            return evaluate_command(args)
        spec = load_spec(find_spec(args.table))
        if args.command == "show":
            from replicate.study.show import show_table

            print(show_table(spec, get_profile(args.profile)))
            return 0
        if args.command == "export":
            from replicate.study.export import export_row
            from replicate.study.results import run_results_root

            how = export_row(spec, args.row, get_profile(args.profile), args.seed, args.format, args.output,
                             run_results_root(args.results))
            print(f"wrote {args.output}: {how}")
            return 0
        if args.seeds < 1:
            raise SpecError(f"--seeds must be at least 1 (got {args.seeds})")
        check_cpu_precision()  # a mistyped or ineffective $REPLICATE_CPU_MATMUL fails here, before any row runs
        from evals.linear import probe_bf16

        probe_bf16()  # and a mistyped $REPLICATE_PROBE_BF16
        from replicate.core.distributed import peer_timeout

        peer_timeout()  # and $REPLICATE_PEER_TIMEOUT
        from replicate.study.runner import run_table

        store = run_table(spec, get_profile(args.profile), args.seeds, args.force, args.data_root, args.results,
                          progress=not args.quiet, keep_stale=args.keep_stale, rows=args.rows)
        from replicate.core import distributed as D
        from replicate.study.results import remember_run

        if D.is_main():
            remember_run(store.root, args.profile, spec.name)  # python -m replicate.render's default

        if not args.no_render and D.is_main():
            from replicate.report.render import render_table

            print(render_table(spec, store, write=True))
        return 0
    except (SpecError, DataError, ResultsError, CheckpointError, CheckpointLoadError, LaunchError,
            PrecisionError, WriteError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:  # a collective that failed because another torchrun process stopped
        line = peer_failure(e)
        if line is None:
            raise
        print(f"error: {line}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if args.command != "run":
            print("interrupted", file=sys.stderr)
            return 130
        # the runner has said where the interrupted row picks up (its checkpoint, or from the start)
        print("interrupted: finished rows are saved; the same command continues the study", file=sys.stderr)
        return 130
    finally:
        shutdown()  # leave the torchrun process group cleanly (a no-op in a single process)


def evaluate_command(args) -> int:
    """``replicate evaluate``: every rank evaluates (the probe may be distributed), rank 0 prints and writes."""
    from replicate.core import distributed as D
    from replicate.study.evaluate import evaluate_checkpoint

    metrics, path = evaluate_checkpoint(args.checkpoint, args.profile, args.arch, args.row, args.seed,
                                        args.data_root, args.results,
                                        progress=not args.quiet, trust=args.trust_checkpoint)
    if D.is_main():
        print(", ".join(f"{k} {v:.2f}" for k, v in metrics.items()))
        print(f"-> {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
