"""The CPU bench: how fast the suite pretrains, against the machine's peak and a plain reference.

Measures, in one process (``python -m tools.bench`` on a machine without a CUDA GPU):
1. MoCo v3 training-step throughput (images/s) of the reduced model at a few batch sizes and of ViT-B/16 at 224²,
   with the trainer's own step (``SuiteStep``: ``make_augment``, ``SelfSupervisedViT``, ``build_optimizer``,
   ``trainer.train_step``) on synthetic in-memory images; warm-up steps are not timed.
2. FLOPs per image of one training step (``torch.utils.flop_counter``) and the achieved fraction of the measured
   matmul peak of the precision the step multiplies in (fp32 or bf16 2048² on CPU, see replicate/runtime/precision.py;
   bf16 8192² on CUDA).
3. The batched augmentation alone; 4. faiss kNN against scikit-learn brute force on the same features;
5. the plain reference (tools/bench/plain.py: Algorithm 1 written straightforwardly), same model size and
   batch, against the suite in each CPU precision; 6. torch.compile, thread-count and bf16-autocast variants;
7. targets with PASS/FAIL, and the estimated time of every reduced table from the measured throughput.
"""
from __future__ import annotations

import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tabulate import tabulate

from replicate.core.config import RunConfig
from replicate.runtime.hardware import cpu_info
from replicate.runtime.precision import LABELS, cpu_has_bf16, step_precision, training_precision
from replicate.runtime.trainer import make_augment
from replicate.study.profiles import REDUCED
from replicate.study.results import ResultStore

from .measure import (
    COMPILE_LIMIT_S,
    count_step_flops,
    flops_str,
    interleaved_ratio,
    matmul_peak,
    time_steps,
)
from .plain import PlainWorker
from .suite import SuiteStep, paper_config, reduced_config, suite_throughput

# iterations per reduced epoch = pretraining images // batch (drop_last, as the trainer)
FMNIST_TRAIN_IMAGES = REDUCED.train_subset or 60000
FMNIST_EVAL_IMAGES = FMNIST_TRAIN_IMAGES + 10000  # bank/probe images + the test set, extracted after every row


@dataclass(frozen=True)
class BenchPlan:
    """How much to measure; ``quick`` is for the test suite (< 30 s), the default for the report (< 10 min)."""

    batch_sizes: tuple[int, ...] = (64, 128, 256)
    warmup: int = 2
    steps: int = 5
    vitb_batch: int = 2
    vitb_steps: int = 2
    pipeline_batches: int = 20
    knn_train: int = 60000
    knn_test: int = 10000
    compile: bool = True
    threads: bool = True
    vitb: bool = True
    plain_workers: tuple[int, ...] = (0, 1)
    blocks: int = 8  # head-to-head: interleaved blocks of (peak probe, suite steps, plain steps)
    block_steps: int = 3
    settle_s: float = 1.5  # idle time before each block: the plain DataLoader's prefetch finishes off the clock
    shape_steps: int = 2  # table estimates: timed steps of each model shape other than the reference

    @classmethod
    def quick(cls) -> BenchPlan:
        return cls(batch_sizes=(16,), warmup=1, steps=1, pipeline_batches=1, knn_train=2000, knn_test=500,
                   compile=False, threads=False, vitb=False, plain_workers=(0,), blocks=1, block_steps=1,
                   settle_s=0.0, shape_steps=0)


# --------------------------------------------------------------------------- the suite against the plain reference
def head_to_head(cfg: RunConfig, device: torch.device, plan: BenchPlan, train_flops_per_image: float) -> dict:
    """The suite against the plain reference, and against the matmul peak, in interleaved blocks.

    This machine's speed drifts within a minute (a shared VM; docs/code-measurements.md), so a suite median taken at one
    time and a plain median or a peak taken at another compare machine states, not code. Each block therefore
    runs a peak probe (best of 3), ``block_steps`` suite steps and ``block_steps`` steps of each plain
    configuration back to back; the ratio and the fraction of peak are computed per block and their medians
    reported. Where the trainer multiplies in bf16 on this CPU (replicate/runtime/precision.py), the suite runs in both
    precisions, each measured against the peak of its own precision (a bf16 probe for the bf16 one).
    """
    default = step_precision(device.type)
    precisions = [default] + (["fp32"] if default == "bf16" else [])
    suites = {p: SuiteStep(cfg, device, cpu_bf16=p == "bf16") for p in precisions}
    workers = [PlainWorker(cfg, w, plan.warmup, device) for w in plan.plain_workers]
    try:
        for suite in suites.values():
            for _ in range(plan.warmup):
                suite()
        blocks = []
        for _ in range(plan.blocks):
            time.sleep(plan.settle_s)
            peaks = {p: matmul_peak(device, reps=3, dtype=torch.bfloat16 if p == "bf16" else None)["flops_per_s"]
                     for p in precisions}
            suite_s = {p: statistics.median(time_steps(suite, 0, plan.block_steps, device)["all_s"])
                       for p, suite in suites.items()}
            # untimed: the batches the DataLoader prefetched (2 per worker) during the idle settle
            plain_s = {w.num_workers: statistics.median(w.steps(plan.block_steps, untimed=2 * w.num_workers))
                       for w in workers}
            blocks.append({"peak_flops_per_s": peaks, "suite_s": suite_s, "plain_s": plain_s,
                           "speedup": {p: min(plain_s.values()) / t for p, t in suite_s.items()},
                           "fraction_of_peak": {p: train_flops_per_image * cfg.batch_size / t / peaks[p]
                                                for p, t in suite_s.items()}})
    finally:
        for w in workers:
            w.close()
    plain = [{"num_workers": w, "batch": cfg.batch_size,
              "step_s": statistics.median(b["plain_s"][w] for b in blocks),
              "images_per_s": cfg.batch_size / statistics.median(b["plain_s"][w] for b in blocks)}
             for w in plan.plain_workers]
    suite = {p: {"step_s": statistics.median(b["suite_s"][p] for b in blocks),
                 "images_per_s": cfg.batch_size / statistics.median(b["suite_s"][p] for b in blocks),
                 "speedup": statistics.median(b["speedup"][p] for b in blocks),
                 "fraction_of_peak": statistics.median(b["fraction_of_peak"][p] for b in blocks),
                 "peak_flops_per_s": statistics.median(b["peak_flops_per_s"][p] for b in blocks)}
             for p in precisions}
    extra = {}
    if set(precisions) == {"bf16", "fp32"}:  # what the bf16 step would claim against the fp32 peak (shown, not scored)
        extra["bf16_of_fp32_peak"] = statistics.median(
            train_flops_per_image * cfg.batch_size / b["suite_s"]["bf16"] / b["peak_flops_per_s"]["fp32"]
            for b in blocks)
    return {"batch": cfg.batch_size, "blocks": blocks, "plain": plain, "precision": default, "suite": suite, **extra,
            **{k: suite[default][k] for k in ("speedup", "fraction_of_peak", "peak_flops_per_s")},
            "suite_step_s": suite[default]["step_s"], "suite_images_per_s": suite[default]["images_per_s"]}


# ------------------------------------------------------------------------------------------------ pipeline and kNN
def pipeline_throughput(plan: BenchPlan, device: torch.device, batch: int = 256) -> dict:
    cfg = reduced_config()
    augment = make_augment(cfg)
    images = torch.rand(batch, cfg.in_chans, cfg.image_size, cfg.image_size, device=device)
    g = torch.Generator(device=device).manual_seed(0)
    t = time_steps(lambda: augment(images, g), 2, plan.pipeline_batches, device)
    return {"batch": batch, "images_per_s": batch / t["step_s"], **t}


def knn_comparison(plan: BenchPlan, k: int = 20, t: float = 0.07) -> dict:
    """The suite's faiss kNN against scikit-learn brute-force cosine kNN with the same exp(sim/t) vote weights."""
    from sklearn.neighbors import KNeighborsClassifier

    from evals.knn import knn_classify

    g = torch.Generator().manual_seed(0)
    # clustered random features, so that the vote is not a coin toss and agreement means something
    centres = torch.randn(10, 128, generator=g)
    ytr = torch.randint(10, (plan.knn_train,), generator=g)
    yte = torch.randint(10, (plan.knn_test,), generator=g)
    xtr = centres[ytr] + 2.0 * torch.randn(plan.knn_train, 128, generator=g)
    xte = centres[yte] + 2.0 * torch.randn(plan.knn_test, 128, generator=g)
    t0 = time.perf_counter()
    pred_faiss = knn_classify(xtr, ytr, xte, k=k, t=t, num_classes=10)
    faiss_s = time.perf_counter() - t0

    clf = KNeighborsClassifier(n_neighbors=k, algorithm="brute", metric="cosine",
                               weights=lambda d: np.exp((1.0 - d) / t))  # cosine distance = 1 - similarity
    t0 = time.perf_counter()
    pred_sk = torch.from_numpy(clf.fit(xtr.numpy(), ytr.numpy()).predict(xte.numpy()))
    sklearn_s = time.perf_counter() - t0
    return {"train": plan.knn_train, "test": plan.knn_test, "dim": 128, "k": k, "faiss_s": faiss_s,
            "sklearn_s": sklearn_s, "agreement": (pred_faiss == pred_sk).float().mean().item(),
            "faiss_acc": (pred_faiss == yte).float().mean().item(), "sklearn_acc": (pred_sk == yte).float().mean().item()}


# ------------------------------------------------------------------------------------------ torch.compile, threads
def in_child(expr: str, env: dict | None = None, limit_s: float = COMPILE_LIMIT_S + 60) -> dict:
    """Evaluate ``expr`` (a bench call returning a dict) in a child process: for torch.compile (a slow or failing
    compile cannot stall or break the bench) and for OpenMP settings that only take effect at process start."""
    code = f"import json, torch; from tools.bench import cpu; r = {expr}; print('RESULT ' + json.dumps(r))"
    t0 = time.perf_counter()
    try:
        out = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True,
                             timeout=limit_s,
                             cwd=Path(__file__).resolve().parents[2], env={**os.environ, **(env or {})})
    except subprocess.TimeoutExpired:
        return {"status": f"gave up after {time.perf_counter() - t0:.0f} s"}
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    if out.returncode or not lines:
        tail = (out.stderr.strip().splitlines() or ["no output"])[-1][:200]
        return {"status": f"failed: {tail}"}
    return {"status": "ok", **json.loads(lines[-1][7:])}


def child_throughput(plan: BenchPlan, batch: int, env: dict | None = None) -> dict:
    return in_child(f"cpu.suite_throughput(cpu.reduced_config({batch}), torch.device('cpu'), {plan.warmup}, "
                    f"{plan.steps})", env)


def compile_vs_eager(batch: int, blocks: int, block_steps: int) -> dict:
    """Eager and ``torch.compile``-d backbones in one process, timed in interleaved blocks (as §5)."""
    cfg, device = reduced_config(batch), torch.device("cpu")
    eager, compiled = SuiteStep(cfg, device), SuiteStep(cfg, device, compile_backbones=True)
    t0 = time.perf_counter()
    compiled()
    compiled()
    warmup_s = time.perf_counter() - t0
    eager()
    r = interleaved_ratio(eager, compiled, blocks, block_steps, device)
    return {"batch": batch, "warmup_s": warmup_s, "eager_step_s": r["base_step_s"],
            "compiled_step_s": r["variant_step_s"], "speedup": r["speedup"],
            "images_per_s": batch / r["variant_step_s"]}


def bf16_vs_fp32(plan: BenchPlan, batch: int, device: torch.device) -> dict:
    """On a CPU with native bf16 (AVX512-BF16 / AMX): the bf16 matmul peak, and the reduced step under bf16
    autocast (as the trainer does on GPU) against fp32, interleaved. Small matmuls gain little from AMX while
    every autocast adds casts, so this is measured rather than switched on. Both run without the trainer's
    oneDNN bf16 matmuls (replicate/runtime/precision.py; §5 measures those), so autocast is all that differs."""
    cfg = reduced_config(batch)
    fp32, bf16 = SuiteStep(cfg, device, amp=False, cpu_bf16=False), SuiteStep(cfg, device, amp=True, cpu_bf16=False)
    for step in (fp32, bf16, fp32, bf16):
        step()
    r = interleaved_ratio(fp32, bf16, plan.blocks, plan.block_steps, device)
    return {"batch": batch, "bf16_peak": matmul_peak(device, dtype=torch.bfloat16), "fp32_step_s": r["base_step_s"],
            "bf16_step_s": r["variant_step_s"], "speedup": r["speedup"]}


def compiled_throughput(plan: BenchPlan, batch: int) -> dict:
    r = in_child(f"cpu.compile_vs_eager({batch}, {plan.blocks}, {plan.block_steps})")
    if r["status"] == "ok" and r["warmup_s"] > COMPILE_LIMIT_S:
        r["status"] = f"compile + warm-up took {r['warmup_s']:.0f} s (> {COMPILE_LIMIT_S} s limit)"
    return r


def threads_throughput(plan: BenchPlan, device: torch.device, batch: int) -> list[dict]:
    """torch intra-op threads 1 vs all cores; then libgomp's wait policies on an idle machine and on one where
    another process keeps a core busy. ACTIVE threads spin at every barrier, which wins a little when the cores
    are free and collapses when one is taken; PASSIVE (the suite's default, ``replicate/__init__.py``) sleeps."""
    rows, default = [], torch.get_num_threads()
    for n in sorted({1, 2, default}):
        torch.set_num_threads(n)
        try:
            r = suite_throughput(reduced_config(batch), device, plan.warmup, plan.steps)
        finally:
            torch.set_num_threads(default)
        rows.append({"setting": f"torch.set_num_threads({n})", **r})
    for load in ("idle", "one core busy"):
        # the competitor: a pure-Python spin loop, i.e. any other single-threaded job on the machine
        rival = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if load != "idle" else None
        try:
            for policy in ("", "ACTIVE", "PASSIVE"):  # "": libgomp's default (spin a while, then sleep)
                r = child_throughput(plan, batch, env={"OMP_WAIT_POLICY": policy})
                shown = policy or "unset (libgomp default)"
                rows.append({"setting": f"OMP_WAIT_POLICY={shown}, {default} threads, {load}", **r})
        finally:
            if rival is not None:
                rival.kill()
                rival.wait()
    return rows


# ------------------------------------------------------------------------------------------------- table estimates
# committed reduced results: the fp32 ones every table renders from, and the CPU bf16-matmul runs that check the
# precision (README, Speed); a table's measured time is taken from those run in the trainer's current precision
MEASURED_ROOTS = ("results", "results/cpu-bf16")


def record_precision(record: dict) -> str:
    return record.get("provenance", {}).get("precision", "fp32")  # written before it was recorded: fp32 on CPU


def measured_table_minutes(spec, precision: str, roots=MEASURED_ROOTS) -> tuple[float | None, set[str]]:
    """Wall time of seed 0 of every row of ``spec`` from committed reduced results pretrained in ``precision``
    (``training_precision``), if all rows are there, and the CPUs those rows ran on (from their provenance;
    "unrecorded" for results written before it was kept)."""
    for root in roots:
        store = ResultStore(root, "reduced")
        records = [store.load(spec.key, row.name, 0) for row in spec.rows]
        if all(r is not None and "wall_time_s" in r and record_precision(r) == precision for r in records):
            cpus = {r.get("provenance", {}).get("cpu", "unrecorded") for r in records}
            return sum(r["wall_time_s"] for r in records) / 60, cpus
    return None, set()


def table_estimates(measured: dict[int, float], knn_s: float, achieved_flops: float, device: torch.device,
                    shape_steps: int = 0, log=print) -> list[dict]:
    """Time of one seed of every reduced table. Iterations come from ``REDUCED.resolve`` for each row. A row with
    the reference model's shape takes the measured images/s at the nearest measured batch, scaled by the
    FLOPs/image ratio (framework, predictor, pooling change the FLOPs a little); a row with another shape (ViT-S/L/H,
    /4 patches, ViT-BN) is timed directly for ``shape_steps`` steps (0: FLOP-scaled like the others)."""
    from replicate.study.spec import all_specs

    flops_cache: dict[tuple, dict] = {}
    timed: dict[tuple, float] = {}

    def shape(cfg: RunConfig) -> tuple:
        return cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.patch_size, cfg.setting.norm_mlp

    def flops(cfg: RunConfig) -> dict:
        # only these fields change the FLOPs per image (batch only through the O(batch) loss logits: negligible)
        s = cfg.setting
        key = (*shape(cfg), s.framework, s.predictor, s.pooling == "cls", s.patch_proj, s.proj_layers, s.pred_layers)
        if key not in flops_cache:
            flops_cache[key] = count_step_flops(cfg, batch=8)
        return flops_cache[key]

    def images_per_s(cfg: RunConfig) -> tuple[float, str]:
        if shape_steps and shape(cfg) != shape(reduced_config()):
            key = (*shape(cfg), cfg.batch_size)
            if key not in timed:
                log(f"  timing {cfg.embed_dim}x{cfg.depth} /{cfg.patch_size} {cfg.setting.norm_mlp} "
                    f"at batch {cfg.batch_size}")
                timed[key] = suite_throughput(cfg, device, 1, shape_steps)["images_per_s"]
            return timed[key], "timed"
        near = min(measured, key=lambda b: abs(math.log(b / cfg.batch_size)))
        return measured[near] * flops(reduced_config(near))["train"] / flops(cfg)["train"], "scaled"

    out, this_cpu, precision = [], cpu_info()[0], training_precision(device.type)
    for spec in all_specs():
        total_s, iters, how = 0.0, 0, set()
        for row in spec.rows:
            setting = spec.setting(row)
            if spec.kind != "pretrain" and setting.init != "pretrained":
                continue  # random / supervised inits need no self-supervised pretraining
            cfg = REDUCED.resolve(setting)
            ips, src = images_per_s(cfg)
            how.add(src)
            n_iter = cfg.epochs * (FMNIST_TRAIN_IMAGES // cfg.batch_size)
            total_s += n_iter * cfg.batch_size / ips
            total_s += FMNIST_EVAL_IMAGES * flops(cfg)["forward"] / achieved_flops + knn_s  # features + kNN
            iters += n_iter
        note = "pretraining of the MoCo v3 rows only; fine-tuning not included" if spec.kind != "pretrain" else ""
        if "timed" in how:
            note = "bigger models timed directly"
        measured_min, cpus = measured_table_minutes(spec, precision)
        fp32_min, fp32_cpus = measured_table_minutes(spec, "fp32") if precision != "fp32" else (None, set())
        where = ("measured on a CPU not recorded in the results" if "unrecorded" in cpus else
                 "measured on another CPU" if cpus - {this_cpu} else "")
        fp32_where = ("fp32 run on a CPU not recorded in the results" if "unrecorded" in fp32_cpus else
                      "fp32 run on another CPU" if fp32_cpus - {this_cpu} else "")
        note = "; ".join(filter(None, [note, where, fp32_where]))
        out.append({"table": spec.name, "title": spec.title, "rows": len(spec.rows), "iterations": iters,
                    "hours": total_s / 3600, "measured_min": measured_min, "measured_fp32_min": fp32_min,
                    "measured_here": measured_min is not None and cpus == {this_cpu}, "notes": note})
    return out


# ------------------------------------------------------------------------------------------------------ the report
def run_bench(plan: BenchPlan, device: torch.device, log=print) -> dict:
    t_start = time.perf_counter()
    res: dict = {"plan": asdict(plan), "device": describe_device(device), "device_type": device.type, "section_s": {},
                 "load_before": os.getloadavg()}

    def section(name: str, fn):
        log(f"{name} ...")
        t0 = time.perf_counter()
        out = fn()
        res["section_s"][name] = time.perf_counter() - t0
        log(f"{name}: {res['section_s'][name]:.1f} s")
        return out

    res["peak"] = section("matmul peak", lambda: matmul_peak(device))
    res["precision"] = step_precision(device.type)
    if res["precision"] == "bf16":  # the suite multiplies in bf16 here: its FLOP/s count against the bf16 peak
        res["peak_bf16"] = matmul_peak(device, dtype=torch.bfloat16)
    step_peak = res.get("peak_bf16", res["peak"])["flops_per_s"]
    ref_batch = max(plan.batch_sizes)
    res["reduced"] = section("reduced throughput", lambda: [
        suite_throughput(reduced_config(b), device, plan.warmup, plan.steps) for b in plan.batch_sizes])
    ref = next(r for r in res["reduced"] if r["batch"] == ref_batch)
    res["reduced_flops_per_image"] = count_step_flops(reduced_config(ref_batch))["train"]
    res["reduced_achieved_flops"] = res["reduced_flops_per_image"] * ref["images_per_s"]
    res["reduced_fraction_of_peak"] = res["reduced_achieved_flops"] / step_peak

    if plan.vitb:
        cfg = paper_config(plan.vitb_batch)
        res["vitb"] = section("ViT-B/16 throughput", lambda: suite_throughput(cfg, device, 1, plan.vitb_steps))
        res["vitb"]["flops_per_image"] = count_step_flops(cfg)["train"]
        res["vitb"]["achieved_flops"] = res["vitb"]["flops_per_image"] * res["vitb"]["images_per_s"]
        res["vitb"]["fraction_of_peak"] = res["vitb"]["achieved_flops"] / step_peak

    res["pipeline"] = section("data pipeline", lambda: pipeline_throughput(plan, device))
    res["knn"] = section("kNN", lambda: knn_comparison(plan))
    h2h = section("head to head", lambda: head_to_head(reduced_config(ref_batch), device, plan,
                                                       res["reduced_flops_per_image"]))
    res["head_to_head"], res["plain"], res["speedup_vs_plain"] = h2h, h2h["plain"], h2h["speedup"]

    import timm.layers

    res["fused_attn"] = bool(timm.layers.use_fused_attn())
    if plan.threads and device.type == "cpu":
        res["threads"] = section("threads", lambda: threads_throughput(BenchPlan(warmup=1, steps=3), device, 128))
    if plan.threads and device.type == "cpu" and cpu_has_bf16():
        res["bf16"] = section("bf16 autocast", lambda: bf16_vs_fp32(plan, ref_batch, device))
    if plan.compile and device.type == "cpu":
        res["compile"] = section("torch.compile", lambda: compiled_throughput(plan, ref_batch))
    res["tables"] = section("table estimates", lambda: table_estimates(
        {r["batch"]: r["images_per_s"] for r in res["reduced"]}, res["knn"]["faiss_s"],
        res["reduced_achieved_flops"], device, plan.shape_steps if device.type == "cpu" else 0, log))
    res["bench_s"] = time.perf_counter() - t_start
    res["load_after"] = os.getloadavg()
    res["targets"] = targets(res, plan)
    return res


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"CUDA {torch.cuda.get_device_name()}"
    name, flags = cpu_info()
    isa = [label for flag, label in (("avx2", "AVX2"), ("avx512f", "AVX-512"), ("avx512_bf16", "AVX512-BF16"),
                                     ("amx_bf16", "AMX-BF16")) if flag in flags]
    return (f"CPU {name} ({platform.machine()}{', ' + ', '.join(isa) if isa else ''}), {os.cpu_count()} cores, "
            f"{torch.get_num_threads()} threads")


def targets(res: dict, plan: BenchPlan) -> list[dict]:
    h2h = res["head_to_head"]
    limit_s = 30 if plan == BenchPlan.quick() else 600
    # a table's time on this machine: measured where committed results ran on this CPU model, else estimated here
    # (a time measured on another CPU says nothing about this one: the VMs here differ severalfold in matmul peak)
    here = {t["table"]: bool(t.get("measured_here")) for t in res["tables"]}
    minutes = {t["table"]: t["measured_min"] if here[t["table"]] else 60 * t["hours"] for t in res["tables"]}
    longest = max(minutes, key=minutes.get)
    default, suite = h2h["precision"], h2h["suite"]
    others = "".join(f"; {p}: {suite[p]['speedup']:.2f}x" for p in suite if p != default)
    peaks = (f", whose FLOP/s are {100 * h2h['bf16_of_fp32_peak']:.0f}% of the fp32 peak: not counted"
             if "bf16_of_fp32_peak" in h2h else "")
    peaks += "".join(f"; {p} matmuls: {100 * suite[p]['fraction_of_peak']:.0f}% of the {p} peak" for p in suite
                     if p != default)
    return [
        {"target": "reduced pretraining >= 1.5x the plain reference (interleaved, §5)",
         "value": f"{h2h['speedup']:.2f}x ({default} matmuls, the trainer's default here{others})",
         "pass": h2h["speedup"] >= 1.5},
        {"target": ">= 50% of measured matmul peak (interleaved, §5)",
         "value": f"{100 * h2h['fraction_of_peak']:.0f}% of the {default} peak (the trainer's {default} matmuls{peaks})",
         "pass": h2h["fraction_of_peak"] >= 0.5},
        {"target": "every reduced table (all rows, one seed) < 30 min (§7: measured on this CPU, else estimated)",
         "value": f"{sum(m < 30 for m in minutes.values())} of {len(minutes)} ({sum(here.values())} measured on this CPU); "
                  f"longest {longest} {minutes[longest]:.0f} min ({'measured' if here[longest] else 'estimated'})",
         "pass": minutes[longest] < 30},
        {"target": f"whole bench < {limit_s} s", "value": f"{res['bench_s']:.0f} s", "pass": res["bench_s"] < limit_s},
    ]


def render(res: dict) -> str:
    peak = res["peak"]["flops_per_s"]
    quick = res["plan"]["batch_sizes"] == list(BenchPlan.quick().batch_sizes)
    md = ["# Performance bench", "",
          f"Device: {res['device']}; torch {torch.__version__}; bench wall time {res['bench_s']:.0f} s; "
          f"1-min load average {res['load_before'][0]:.1f} before, {res['load_after'][0]:.1f} after "
          f"(above the core count = the machine was shared and the numbers are low)"
          + (" (**--quick**: tiny sizes, numbers are not meaningful)" if quick else "") + ".",
          ("Step times are medians over timed steps after untimed warm-up steps; images/s counts source images "
          "(each gives two views)."), ""]
    md += ["## Targets", "", tabulate([[t["target"], t["value"], "PASS" if t["pass"] else "FAIL"]
                                       for t in res["targets"]], ["target", "measured", ""], tablefmt="pipe"), ""]

    md += ["## 1. Pretraining throughput", "",
           ("Full MoCo v3 steps (two views through `TwoViewBatchAugment`, query fwd+bwd, momentum update and key "
           "fwd, AdamW step) of `SelfSupervisedViT` on synthetic in-memory images, in the trainer's precision "
           f"({LABELS[res['precision']]})."), ""]
    reduced = reduced_config()
    reduced_name = f"ViT {reduced.embed_dim}x{reduced.depth} /{reduced.patch_size}"
    rows = [[f"reduced {reduced_name}, {reduced.image_size}² gray", r["batch"], f"{r['step_s']:.3f}",
             f"{r['images_per_s']:.0f}", f"{r['warmup_s']:.1f}"] for r in res["reduced"]]
    if "vitb" in res:
        v = res["vitb"]
        where = "CPU, " if "CPU" in res["device"] else ""
        rows.append([f"paper ViT-B/16, 224² RGB ({where}{v['steps']} timed step(s))", v["batch"], f"{v['step_s']:.3f}",
                     f"{v['images_per_s']:.2f}", f"{v['warmup_s']:.1f}"])
    else:
        rows.append(["paper ViT-B/16, 224² RGB", "-", "skipped (--quick)", "-", "-"])
    md += [tabulate(rows, ["model", "batch", "s/step", "images/s", "warm-up s"], tablefmt="pipe"), ""]

    step_peak = res.get("peak_bf16", res["peak"])
    bf16_peak = (f"; {step_peak['what']} = **{flops_str(step_peak['flops_per_s'])}FLOP/s**, the peak the steps above "
                 "(bf16 products) are measured against" if "peak_bf16" in res else "")
    md += ["## 2. FLOPs and peak", "",
           (f"Peak: {res['peak']['what']} = **{flops_str(peak)}FLOP/s**{bf16_peak}. FLOPs from `torch.utils.flop_counter."
           "FlopCounterMode` on one training step (matmuls, convs and attention; elementwise ops are not FLOPs "
           "here), divided by the batch."), ""]
    ref = max(res["reduced"], key=lambda r: r["batch"])
    rows = [["reduced", ref["batch"], flops_str(res["reduced_flops_per_image"]),
             flops_str(res["reduced_achieved_flops"]) + "FLOP/s", f"{100 * res['reduced_fraction_of_peak']:.0f}%"]]
    if "vitb" in res:
        v = res["vitb"]
        rows.append(["ViT-B/16", v["batch"], flops_str(v["flops_per_image"]), flops_str(v["achieved_flops"]) + "FLOP/s",
                     f"{100 * v['fraction_of_peak']:.0f}%"])
    md += [tabulate(rows, ["model", "batch", "FLOPs/image/step", "achieved", "of peak"], tablefmt="pipe"), ""]

    p = res["pipeline"]
    md += ["## 3. Data pipeline alone", "",
           (f"`TwoViewBatchAugment` on batches of {p['batch']} {reduced.image_size}x{reduced.image_size} images: "
            f"**{p['images_per_s']:.0f} images/s** "
           f"({1000 * p['step_s']:.1f} ms per batch, both views)."), ""]

    k = res["knn"]
    md += ["## 4. kNN evaluation", "",
           (f"{k['train']}x{k['dim']} train / {k['test']}x{k['dim']} test features (clustered random), k={k['k']}, "
           "weights exp(cos/0.07)."), "",
           tabulate([["`evals.knn.knn_classify` (faiss IndexFlatIP)", f"{k['faiss_s']:.2f}", f"{100 * k['faiss_acc']:.1f}"],
                     ["scikit-learn KNeighborsClassifier (brute, cosine)", f"{k['sklearn_s']:.2f}",
                      f"{100 * k['sklearn_acc']:.1f}"]], ["implementation", "seconds", "accuracy %"], tablefmt="pipe"),
           "", (f"Predictions agree on {100 * k['agreement']:.2f}% of test points; faiss is "
           f"{k['sklearn_s'] / k['faiss_s']:.1f}x faster."), ""]

    h2h = res["head_to_head"]
    precisions = list(h2h["suite"])
    fp32 = "fp32" if "fp32" in precisions else precisions[0]
    md += ["## 5. Head to head: plain reference and matmul peak, interleaved", "",
           ("The plain reference is Algorithm 1 written straightforwardly: per-image PIL transforms "
           "(RandomResizedCrop, ColorJitter(0.4, 0.4) p=0.8, PIL Gaussian blur, solarize, flip) in a torch "
           "DataLoader, eager `timm` ViT of the same size with learned patch projection, the official `_build_mlp` "
           "heads, python-loop momentum update, `F.cross_entropy` loss, AdamW; same batch as the reduced profile. It "
           "runs in a fresh process of its own (default allocator and settings), driven step by step over a pipe."),
           "",
           (f"The machine's speed drifts (a shared VM: in this run the fp32 matmul peak probe ranged "
           f"{flops_str(min(b['peak_flops_per_s'][fp32] for b in h2h['blocks']))}FLOP/s to "
           f"{flops_str(max(b['peak_flops_per_s'][fp32] for b in h2h['blocks']))}FLOP/s), so "
           f"{len(h2h['blocks'])} blocks each run a peak probe (best of 3) per precision, "
           f"{res['plan']['block_steps']} suite steps per precision and {res['plan']['block_steps']} steps of each plain "
           "configuration back to back, after an idle second (with DataLoader workers, the plain reference first "
           "runs 2 untimed steps per worker: batches prefetched while idle would be free). The ratio and the "
           "fraction of peak are per block, and the medians are reported."), ""]
    workers = sorted(h2h["blocks"][0]["plain_s"], key=int)
    rows = [[i + 1, *[flops_str(b["peak_flops_per_s"][p]) + "FLOP/s" for p in precisions],
             *[f"{b['suite_s'][p]:.3f}" for p in precisions],
             *[f"{b['plain_s'][w]:.3f}" for w in workers],
             *[f"{b['speedup'][p]:.2f}x" for p in precisions],
             *[f"{100 * b['fraction_of_peak'][p]:.0f}%" for p in precisions]] for i, b in enumerate(h2h["blocks"])]
    md += [tabulate(rows, ["block", *[f"{p} peak probe" for p in precisions],
                           *[f"suite {p} s/step" for p in precisions], *[f"plain w={w} s/step" for w in workers],
                           *[f"suite {p} vs best plain" for p in precisions],
                           *[f"{p} of {p} peak" for p in precisions]], tablefmt="pipe"), ""]
    rows = [[f"plain, num_workers={r['num_workers']}", r["batch"], f"{r['step_s']:.3f}", f"{r['images_per_s']:.0f}"]
            for r in h2h["plain"]]
    rows += [[f"this suite, {LABELS[p]}" + (" (the trainer's default here)" if p == h2h["precision"] else ""),
              h2h["batch"], f"{h2h['suite'][p]['step_s']:.3f}", f"{h2h['suite'][p]['images_per_s']:.0f}"]
             for p in precisions]
    md += [tabulate(rows, ["implementation (median over blocks)", "batch", "s/step", "images/s"], tablefmt="pipe"),
           "", "Suite / best plain configuration, and the fraction of the peak probed in the same block (medians): "
           + "; ".join(f"{p} matmuls **{h2h['suite'][p]['speedup']:.2f}x**, "
                       f"**{100 * h2h['suite'][p]['fraction_of_peak']:.0f}%** of the {p} peak (median probe "
                       f"{flops_str(h2h['suite'][p]['peak_flops_per_s'])}FLOP/s)" for p in precisions) + "."
           + (f" The bf16 step's FLOP/s are {100 * h2h['bf16_of_fp32_peak']:.0f}% of the fp32 peak; the target counts "
              "them against the bf16 peak, the unit that computes them." if "bf16_of_fp32_peak" in h2h else ""), ""]

    md += ["## 6. torch.compile, threads and precision", "",
           (f"timm fused attention (`F.scaled_dot_product_attention`, `timm.layers.use_fused_attn()`): "
           f"{'on' if res['fused_attn'] else 'off'}"
           + (" for fp32; with bf16 matmuls the trainer runs it unfused (PyTorch's CPU flash-attention kernel is much "
              "slower in that mode, replicate/runtime/precision.py)." if res.get("precision") == "bf16" else ".")
           + " The rows below run in the trainer's precision."), ""]
    if "threads" in res:
        md += [tabulate([[r["setting"], r.get("batch", "-"), f"{r['step_s']:.3f}" if "step_s" in r else r["status"],
                          f"{r['images_per_s']:.0f}" if "images_per_s" in r else "-"] for r in res["threads"]],
                        ["setting", "batch", "s/step", "images/s"], tablefmt="pipe"), ""]
    else:
        md += ["Thread variants: skipped.", ""]
    c = res.get("compile")
    if c is None:
        md += ["torch.compile: skipped" + (" (--quick)." if quick else " (not on CPU)."), ""]
    elif c["status"] == "ok":
        md += [(f"torch.compile of both backbones (`nn.Module.compile`, inductor), against eager in the same "
               f"process, interleaved blocks: compile + warm-up {c['warmup_s']:.0f} s, then "
               f"{c['compiled_step_s']:.3f} s/step vs {c['eager_step_s']:.3f} s/step eager at batch {c['batch']}: "
               f"**{c['speedup']:.2f}x** (median of per-block ratios). The trainer compiles on GPUs only "
               "(`REPLICATE_COMPILE=1` turns it on for CPU runs)."), ""]
    else:
        md += [f"torch.compile: {c['status']}.", ""]
    b = res.get("bf16")
    if b is not None:
        md += [(f"bf16 (this CPU has native bf16): the bf16 2048² matmul reaches {flops_str(b['bf16_peak']['flops_per_s'])}"
                f"FLOP/s ({b['bf16_peak']['flops_per_s'] / res['peak']['flops_per_s']:.1f}x the fp32 peak), but the "
                f"reduced step under bf16 autocast takes {b['bf16_step_s']:.3f} s vs {b['fp32_step_s']:.3f} s in "
                f"fp32 at batch {b['batch']} (**{b['speedup']:.2f}x**, interleaved): at these small shapes the casts "
                "cost more than the matmuls save. The trainer therefore multiplies in bf16 inside oneDNN's fp32 "
                "matmuls instead (`torch.backends.mkldnn.matmul.fp32_precision = \"bf16\"`, "
                "replicate/runtime/precision.py): "
                "see §5 for that step against fp32."), ""]
    elif res["device"].startswith("CPU"):
        md += ["bf16: " + ("skipped (--quick)." if quick else
                           "not measured (this CPU has no native bf16: no AVX512-BF16 or AMX)."), ""]

    md += ["## 7. Time of the reduced tables (one seed)", "",
           f"Estimated: iterations = epochs x ({FMNIST_TRAIN_IMAGES} // batch) from `REDUCED.resolve` for each row; "
           f"rows with the reference model ({reduced_name}) take its measured images/s (§1) scaled by FLOPs/image, "
           "rows with another model (ViT-S/L/H, /4 patches, ViT-BN) are timed directly; plus feature extraction of "
           f"{FMNIST_EVAL_IMAGES} images at the achieved FLOP/s and one kNN. Linear probes are not included. "
           "Measured: the wall time of seed 0 of every row in committed results pretrained in the trainer's "
           f"precision here ({training_precision(res['device_type'])}): `results/reduced/` holds the fp32 runs, "
           "`results/cpu-bf16/reduced/` the bf16-matmul ones (— if not run); where the trainer multiplies in bf16, the "
           "committed fp32 runs are shown beside them, for scale (an upper bound: fp32 is slower here, §5). The target "
           "counts a measured time only where those rows ran on this CPU model; elsewhere it takes the estimate."
           + (" In --quick mode the throughput comes from a tiny batch, so these hours are not meaningful." if quick
              else ""), ""]
    fp32_col = any(t.get("measured_fp32_min") is not None for t in res["tables"])
    md += [tabulate([[t["table"], t["title"], t["rows"], t["iterations"], f"{60 * t['hours']:.0f}",
                      "—" if t.get("measured_min") is None else f"{t['measured_min']:.0f}",
                      *(["—" if t.get("measured_fp32_min") is None else f"{t['measured_fp32_min']:.0f}"]
                        if fp32_col else []), t["notes"]]
                     for t in res["tables"]],
                    ["table", "title", "rows", "iterations", "estimated min", "measured min",
                     *(["measured min, fp32 (slower)"] if fp32_col else []), "notes"],
                    tablefmt="pipe"), "",
           f"All tables: **{sum(t['hours'] for t in res['tables']):.1f} h** (estimated) on this machine.", ""]
    return "\n".join(md)
