"""The GPU bench: model FLOP utilisation (MFU) of the paper's ViT-B/16 MoCo v3 step at 224², and what feeds it.

``python -m tools.bench`` runs this instead of the CPU bench when a CUDA GPU is present and writes
``results/bench/gpu.md`` (raw numbers in ``gpu.json``). On one GPU it measures:
1. the bf16 matmul peak (8192², random data) beside the datasheet's dense bf16 rate;
2. the suite's training step (``SuiteStep``: batched GPU augmentation, then the trainer's own ``train_step``: bf16
   autocast, fused AdamW, foreach momentum update) of ViT-B/16 at a few batches per GPU, eager and with
   ``torch.compile``-d backbones: images/s, FLOPs counted by ``torch.utils.flop_counter`` and MFU against both peaks,
   peak memory;
3. where a step's time goes: the batched augmentation alone, the model step alone;
4. the paper path's data: the official per-image PIL pipeline (``two_view_pil_transforms``) and the suite's
   (``two_view_pil_crops`` in the workers, the photometric part batched on the GPU) in DataLoaders, against what the
   GPU step consumes; and the plain Algorithm-1 reference (tools/bench/plain.py, with bf16 autocast) interleaved
   with the suite as the trainer runs at paper scale (crops loader, GPU photometric, compiled backbones).
"""
from __future__ import annotations

import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tabulate import tabulate

from replicate.core.augment import two_view_pil_crops

from .measure import count_step_flops, flops_str, interleaved_ratio, matmul_peak, sync, time_steps
from .plain import PlainStep, PlainTwoViewDataset, endless, plain_images
from .suite import SuiteStep, paper_config, reduced_config

# dense bf16 tensor-core rate by NVIDIA's datasheets (no sparsity); a lead beside the measured peak, matched in order
DATASHEET_BF16 = (("H100 PCIe", 756e12), ("H100", 989.4e12), ("H200", 989.4e12), ("A100", 312e12))
MFU_TARGET = 0.40


@dataclass(frozen=True)
class GpuPlan:
    batches: tuple[int, ...] = (64, 128, 256)  # per GPU; the official ViT-B run uses 4096 over 32-64 GPUs
    compile_batches: tuple[int, ...] = (128, 256)
    warmup: int = 5
    steps: int = 20
    loader_batches: int = 12
    folder_images: int = 1024  # distinct synthetic JPEGs for the trainer's FolderBatches (hard-linked to 4 batches
    #                            per worker)
    blocks: int = 4
    block_steps: int = 8
    model: str = "paper"  # "reduced": the reduced model, for testing this module on a CPU

    @classmethod
    def quick(cls) -> GpuPlan:
        return cls(batches=(8,), compile_batches=(), warmup=1, steps=1, loader_batches=1, folder_images=32, blocks=1,
                   block_steps=1, model="reduced")

    def config(self, batch: int):
        return paper_config(batch) if self.model == "paper" else reduced_config(batch)


def datasheet_peak(name: str) -> float | None:
    return next((rate for key, rate in DATASHEET_BF16 if key in name), None)


def release(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_memory_gb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda" else None


def step_row(plan: GpuPlan, batch: int, compiled: bool, device: torch.device, flops_per_image: float,
             peak: float) -> dict:
    """One configuration of the suite's step; an out-of-memory batch is a row that says so."""
    row = {"batch": batch, "compiled": compiled}
    release(device)
    try:
        step = SuiteStep(plan.config(batch), device, compile_backbones=compiled)
        t = time_steps(step, plan.warmup + (3 if compiled else 0), plan.steps, device)
    except torch.OutOfMemoryError:
        return {**row, "status": "out of memory"}
    ips = batch / t["step_s"]
    return {**row, "status": "ok", **t, "images_per_s": ips, "achieved_flops": flops_per_image * ips,
            "mfu": flops_per_image * ips / peak, "memory_gb": peak_memory_gb(device)}


def breakdown(plan: GpuPlan, batch: int, device: torch.device, compiled: bool) -> dict:
    """Augmentation alone, model step alone (fixed views) and the whole step, at one batch."""
    release(device)
    step = SuiteStep(plan.config(batch), device, compile_backbones=compiled)
    x1, x2 = step.views()
    model = time_steps(lambda: step.model_step(x1, x2), plan.warmup, plan.steps, device)
    augment = time_steps(step.views, 2, plan.steps, device)
    whole = time_steps(step, 2, plan.steps, device)
    return {"batch": batch, "compiled": compiled, "augment_s": augment["step_s"], "model_s": model["step_s"],
            "step_s": whole["step_s"]}


def crops_loader(cfg, workers: int, length: int, two_views=None) -> torch.utils.data.DataLoader:
    """A DataLoader over random 256² RGB images (decoded-JPEG scale, no decoding cost) with a per-image pipeline:
    the suite's crops (default) or ``two_views``."""
    dataset = PlainTwoViewDataset(plain_images(cfg, 512), cfg, length,
                                  two_views or two_view_pil_crops(cfg.image_size, cfg.crop_min))
    return torch.utils.data.DataLoader(dataset, batch_size=cfg.batch_size, num_workers=workers, drop_last=True,
                                       shuffle=True, pin_memory=torch.cuda.is_available(),
                                       persistent_workers=workers > 0)


def loader_throughput(plan: GpuPlan, batch: int, workers: int) -> list[dict]:
    """Images/s each per-image pipeline delivers with ``workers`` processes: the official one (every op in PIL)
    and the suite's (crops only; the rest runs batched on the GPU, timed in the breakdown). Timed from the loader's
    start (worker start-up included) over at least 4 batches per worker: with fewer, the workers' first batches,
    made in parallel before the clock starts, would be counted as throughput."""
    cfg = plan.config(batch)
    n_batches = max(plan.loader_batches, 4 * max(workers, 1))
    rows = []
    for name, two_views in (("official: every op per image in PIL", PlainTwoViewDataset(plain_images(cfg, 1), cfg)
                             .two_views), ("suite: crops per image, the rest batched on the GPU", None)):
        loader = crops_loader(cfg, workers, n_batches * batch, two_views)
        t0, n = time.perf_counter(), 0
        for views in loader:
            n += len(views[0])
        seconds = time.perf_counter() - t0
        rows.append({"pipeline": name, "batch": batch, "workers": workers, "images": n,
                     "images_per_s": n / seconds})
        del loader
    return rows


def synthetic_image_folder(root: Path, images: int, size: tuple[int, int] = (500, 375), classes: int = 4,
                           copies: int = 1) -> Path:
    """An ImageFolder of JPEGs at ImageNet's typical size: smooth random images (upsampled noise), so that decoding
    costs what natural photographs cost rather than what white noise does; ``copies`` hard links of each."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(images):
        d = root / "train" / f"n{i % classes:08d}"
        d.mkdir(parents=True, exist_ok=True)
        small = Image.fromarray(rng.integers(0, 256, (12, 16, 3), np.uint8)).resize(size, Image.BICUBIC)
        small.save(d / f"{i:06d}.JPEG", quality=90)
        for c in range(1, copies):
            os.link(d / f"{i:06d}.JPEG", d / f"{i:06d}_{c}.JPEG")
    return root


def folder_throughput(plan: GpuPlan, batch: int, workers: int, device: torch.device) -> dict:
    """The trainer's own ``FolderBatches`` on a synthetic JPEG ImageFolder: decoding and crops in ``workers``
    processes, the photometric ops batched on the device, with the GPU otherwise idle: images/s it can deliver,
    from the loader's start over at least 4 batches per worker (as ``loader_throughput``)."""
    from replicate.runtime.trainer import FolderBatches

    cfg = plan.config(batch).model_copy(update={"num_workers": workers})
    n_batches = max(4, 4 * workers)
    copies = math.ceil(n_batches * batch / plan.folder_images)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        root = synthetic_image_folder(Path(tmp), plan.folder_images, copies=copies)
        made_s = time.perf_counter() - t0
        batches = FolderBatches(cfg, str(root), device)
        x = torch.rand(batches.local_batch, 3, cfg.image_size, cfg.image_size, device=device)
        batches.augment.photometric(x, torch.Generator(device=device).manual_seed(0), view=1)  # compile off the clock
        sync(device)
        t0 = time.perf_counter()
        for step in range(batches.iters_per_epoch):
            batches.batch(step)
        sync(device)
        seconds = time.perf_counter() - t0
    n = batches.iters_per_epoch * batch
    return {"batch": batch, "workers": workers, "jpegs": plan.folder_images, "files": plan.folder_images * copies,
            "images": n, "make_s": made_s, "images_per_s": n / seconds}


class FolderSuiteStep(SuiteStep):
    """The trainer's paper-scale step: uint8 crops from DataLoader workers, photometric ops batched on the device."""

    def __init__(self, cfg, device: torch.device, workers: int, compile_backbones: bool):
        super().__init__(cfg, device, compile_backbones)
        self.batches = endless(crops_loader(cfg, workers, 64 * cfg.batch_size))

    def views(self):
        return self.augment.from_crops(*next(self.batches), self.gen, self.device)


def plain_vs_suite(plan: GpuPlan, batch: int, workers: int, device: torch.device) -> dict:
    """The plain reference (with its PIL DataLoader) and the suite as the trainer runs on this device (crops
    loader, batched photometric ops, backbones compiled on GPU), each in its steady state: first as many untimed
    steps as its loader holds prefetched batches (2 per worker), so that a slow loader shows. (Interleaved blocks
    would let each loader refill its buffer during the other's block, hiding it.) Then both model steps alone on
    the same fixed views, interleaved, which separates the data path from the model code."""
    release(device)
    cfg = plan.config(batch)
    compiled = device.type == "cuda"
    suite = FolderSuiteStep(cfg, device, workers, compiled)
    plain = PlainStep(cfg, device, workers, amp=device.type == "cuda", pool=512)
    for _ in range(plan.warmup + (3 if compiled else 0)):
        suite()
        plain()
    drain = 2 * workers + 2
    whole = {name: time_steps(step, drain, plan.steps, device)["step_s"] for name, step in (("plain", plain),
                                                                                           ("suite", suite))}
    x1, x2 = suite.views()
    model = interleaved_ratio(lambda: plain.model_step(x1, x2), lambda: suite.model_step(x1, x2), plan.blocks,
                              plan.block_steps, device)
    return {"batch": batch, "workers": workers, "compiled": compiled, "plain_step_s": whole["plain"],
            "suite_step_s": whole["suite"], "speedup": whole["plain"] / whole["suite"], "steady_state": True,
            "plain_model_s": model["base_step_s"], "suite_model_s": model["variant_step_s"],
            "model_speedup": model["speedup"], "memory_gb": peak_memory_gb(device)}


def run_gpu_bench(plan: GpuPlan, device: torch.device, log=print) -> dict:
    t_start = time.perf_counter()
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (test run)"
    res: dict = {"plan": asdict(plan), "device": name, "torch": torch.__version__, "section_s": {}}
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # as the trainer
        torch.backends.cudnn.allow_tf32 = True
        props = torch.cuda.get_device_properties(device)
        res["sms"], res["memory_total_gb"] = props.multi_processor_count, props.total_memory / 2 ** 30

    def section(key: str, fn):
        log(f"{key} ...")
        t0 = time.perf_counter()
        res[key] = fn()
        res["section_s"][key] = time.perf_counter() - t0
        log(f"{key}: {res['section_s'][key]:.1f} s")

    section("peak", lambda: matmul_peak(device, reps=20))
    res["datasheet_peak"] = datasheet_peak(name)
    peak = res["peak"]["flops_per_s"]
    res["flops"] = count_step_flops(plan.config(max(plan.batches)))
    section("steps", lambda: [step_row(plan, b, False, device, res["flops"]["train"], peak) for b in plan.batches]
            + [step_row(plan, b, True, device, res["flops"]["train"], peak) for b in plan.compile_batches])
    ok = [r for r in res["steps"] if r["status"] == "ok"]
    eager = [r for r in ok if not r["compiled"]]
    ref_batch = max(eager, key=lambda r: r["images_per_s"])["batch"]
    workers = max(1, (os.cpu_count() or 2) - 1)
    section("breakdown", lambda: breakdown(plan, ref_batch, device, compiled=device.type == "cuda"))
    section("loader", lambda: loader_throughput(plan, ref_batch, workers))
    section("folder", lambda: folder_throughput(plan, ref_batch, workers, device))
    section("plain", lambda: plain_vs_suite(plan, ref_batch, workers, device))
    best = max(ok, key=lambda r: r["mfu"])
    res["best"] = best
    res["targets"] = [{"target": f"ViT-B/16 224² MFU >= {100 * MFU_TARGET:.0f}% of the measured bf16 peak",
                       "value": f"{100 * best['mfu']:.1f}% (batch {best['batch']}, "
                                f"{'compiled' if best['compiled'] else 'eager'})",
                       "pass": best["mfu"] >= MFU_TARGET}]
    if res["datasheet_peak"]:
        mfu_ds = best["achieved_flops"] / res["datasheet_peak"]
        res["targets"].append({"target": f"the same against the datasheet's dense bf16 rate "
                                         f"({flops_str(res['datasheet_peak'])}FLOP/s)",
                               "value": f"{100 * mfu_ds:.1f}%", "pass": mfu_ds >= MFU_TARGET})
    res["bench_s"] = time.perf_counter() - t_start
    return res


def render_gpu(res: dict) -> str:
    peak, flops = res["peak"]["flops_per_s"], res["flops"]
    ds = res["datasheet_peak"]
    md = ["# Performance bench: GPU", "",
          (f"Device: {res['device']}" + (f" ({res['sms']} SMs, {res['memory_total_gb']:.0f} GiB)" if "sms" in res
                                          else "") + f"; torch {res['torch']}; bench wall time {res['bench_s']:.0f} s."
           + (" **Test run on a CPU with the reduced model: numbers are not meaningful.**"
              if res["plan"]["model"] != "paper" else "")),
          ("Step times are medians over timed steps after untimed warm-up steps (CUDA-synchronised); images/s counts "
           "source images (each gives two 224² views)."), *[f"Note: {n}" for n in res.get("notes", [])], "",
          "## Targets", "",
          tabulate([[t["target"], t["value"], "PASS" if t["pass"] else "FAIL"] for t in res["targets"]],
                   ["target", "measured", ""], tablefmt="pipe"), "",
          "## 1. Peak", "",
          (f"Measured: {res['peak']['what']} = **{flops_str(peak)}FLOP/s**. Datasheet dense bf16: "
           + (f"{flops_str(ds)}FLOP/s." if ds else "n/a for this GPU.")), "",
          "## 2. ViT-B/16 MoCo v3 training step", "",
          ("`SuiteStep`: both views from `TwoViewBatchAugment` on the GPU, query fwd+bwd under bf16 autocast, "
           "`torch._foreach_lerp_` momentum update and key fwd, fused AdamW; the paper's heads (4096-wide MLPs, "
           f"BN). FLOPs per image per step (`FlopCounterMode`): {flops_str(flops['train'])}FLOP (one backbone forward: "
           f"{flops_str(flops['forward'])}FLOP). MFU = FLOPs/image x images/s / peak."), ""]
    rows = []
    for r in res["steps"]:
        mode = "torch.compile (backbones, jitter)" if r["compiled"] else "eager"
        if r["status"] != "ok":
            rows.append([mode, r["batch"], r["status"], "-", "-", "-", "-", "-"])
            continue
        rows.append([mode, r["batch"], f"{1000 * r['step_s']:.1f}", f"{r['images_per_s']:.0f}",
                     flops_str(r["achieved_flops"]) + "FLOP/s", f"{100 * r['mfu']:.1f}%",
                     f"{100 * r['achieved_flops'] / ds:.1f}%" if ds else "n/a",
                     "-" if r["memory_gb"] is None else f"{r['memory_gb']:.1f}"])
    md += [tabulate(rows, ["mode", "batch/GPU", "ms/step", "images/s", "achieved", "MFU (measured peak)",
                           "MFU (datasheet)", "peak mem GiB"], tablefmt="pipe"), ""]
    b = res["breakdown"]
    md += ["## 3. Where a step goes", "",
           tabulate([["batched augmentation (both views)", f"{1000 * b['augment_s']:.1f}"],
                     ["model step on fixed views", f"{1000 * b['model_s']:.1f}"],
                     ["whole step", f"{1000 * b['step_s']:.1f}"]],
                    [f"{'compiled' if b['compiled'] else 'eager'}, batch {b['batch']}", "ms"],
                    tablefmt="pipe"), "",
           f"The augmentation is {100 * b['augment_s'] / b['step_s']:.1f}% of a step.", ""]
    p = res["plain"]
    need = p["batch"] / p["suite_step_s"]
    md += ["## 4. The paper path's data, and the plain reference", "",
           (f"DataLoaders over random 256² RGB images (a decoded ImageNet JPEG's scale; no decoding here, so real data "
            f"costs more per image), batch {p['batch']}, timed from the loader's start over 4 batches per worker; the "
            f"suite's step as the trainer runs it consumes {need:.0f} images/s."), "",
           tabulate([[r["pipeline"], r["workers"], f"{r['images_per_s']:.0f}",
                      "yes" if r["images_per_s"] >= need else f"no ({r['images_per_s'] / need:.2f} of it)"]
                     for r in res["loader"]], ["per-image pipeline", "workers", "images/s", "keeps up?"],
                    tablefmt="pipe"), ""]
    f = res["folder"]
    md += [(f"The trainer's own `FolderBatches` on {f['images']} images ({f['jpegs']} distinct synthetic 500x375 "
            "JPEGs, ImageNet's typical size, smooth content, hard-linked), decoding included, "
            f"{f['workers']} workers, photometric ops on the device, timed from the loader's start: "
            f"**{f['images_per_s']:.0f} images/s** ("
            + ("keeps up" if f["images_per_s"] >= need else f"{f['images_per_s'] / need:.2f} of what the step needs")
            + ")."), "",
           ("The plain reference is Algorithm 1 written straightforwardly: the official PIL pipeline in a "
            "DataLoader, eager timm ViT-B/16 with the official `_build_mlp` heads, python-loop momentum update, "
            "AdamW, bf16 autocast (as the official code's AMP). The suite runs as the trainer does on this device "
            f"(crops loader, photometric ops batched on the GPU{', backbones compiled' if p['compiled'] else ''}). "
            + ("Whole steps in each one's steady state (untimed steps first, as many as its loader prefetches); "
               if p.get("steady_state") else "Whole steps in interleaved blocks; ")
            + "then both model steps alone on the same fixed views, interleaved."), "",
           tabulate([["whole step, each with its data pipeline", f"{1000 * p['plain_step_s']:.1f}",
                      f"{1000 * p['suite_step_s']:.1f}", f"**{p['speedup']:.2f}x**"],
                     ["model step alone", f"{1000 * p['plain_model_s']:.1f}", f"{1000 * p['suite_model_s']:.1f}",
                      f"{p['model_speedup']:.2f}x"]],
                    [f"batch {p['batch']}", "plain ms", "suite ms", "suite speed-up"], tablefmt="pipe"), ""]
    return "\n".join(md)
