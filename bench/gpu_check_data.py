"""Helper of bench/gpu_check.sh (stdlib only at import; torch only in `meta`).

    python3 bench/gpu_check_data.py meta WORK/meta.json
    python3 bench/gpu_check_data.py photos ROOT --classes 10 --per-class 400 --side 400 500 --procs 10
    python3 bench/gpu_check_data.py wait-train RUN/log.jsonl --pid PID --min-epoch 2 --timeout 120
    python3 bench/gpu_check_data.py combine WORK OUT/gpu_check.json

`combine` gathers every step's status (WORK/steps.jsonl), the benches' own JSON, the pytest
junit XML and the training run's log.jsonl into one JSON, with the performance targets (docs/benchmarks.md) and
reference figures next to the measured ones. It is cheap and is re-run after every step, so a
check cut off half-way still leaves a complete file for the steps it finished.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from concurrent.futures import ProcessPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

# Performance targets (docs/benchmarks.md; reference figures: one H200, 16 cores, 2026-11-26; targets)
REFERENCE = {
    "rn50_moco_v2_step_anchors_per_s": 3100,
    "clim_step_2q_2k_anchors_per_s": 1600,
    "dali_moco_v2_graph_anchors_per_s": 9900,
    "torchvision_pil_16_workers_anchors_per_s": 640,
    "kmeans_10k_20it_1.28M_s": 0.8,
    "naive_torch_knn_k40_1.28M_s": 19.0,
    "dali_parallel_source_4_views_anchors_per_s": 5700,
}
TARGETS = {
    "data_wait_share_max": 0.02,
    "small_images_data_wait_share_max": 0.05,
    "epoch_boundary_steps_max": 2.0,
    "clim_multires_anchors_per_s_min": 1000,
    "real_over_synthetic_min": 0.95,
    "mining_round_1.28M_max_s": 10.0,
}


# ---------------------------------------------------------------------------------------------
# meta: what the machine has, before anything else runs

def _try_version(name: str):
    try:
        module = __import__(name, fromlist=["__version__"])
        return str(getattr(module, "__version__", "present"))
    except Exception as e:  # noqa: BLE001 - record any import failure
        return f"missing ({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''})"


def cmd_meta(args) -> int:
    info = {"date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "commit": os.environ.get("COMMIT") or _git_commit(), "python": platform.python_version(),
            "cores": os.cpu_count(), "host": platform.node(), "small": os.environ.get("SMALL", "0") == "1"}
    try:
        info["cpu"] = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        info["cpu"] = platform.processor()
    import torch

    info["torch"] = torch.__version__
    info["cuda_available"] = torch.cuda.is_available()
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info["gpu"] = {"name": p.name, "memory_gib": round(p.total_memory / 2**30, 1),
                       "capability": f"{p.major}.{p.minor}", "count": torch.cuda.device_count(),
                       "torch_cuda": torch.version.cuda}
    for name, module in (("dali", "nvidia.dali"), ("faiss", "faiss"), ("webdataset", "webdataset"),
                         ("skimage", "skimage"), ("pytest", "pytest"), ("sklearn", "sklearn"), ("scipy", "scipy")):
        info[name] = _try_version(module)
    try:
        import faiss

        info["faiss_gpus"] = int(faiss.get_num_gpus()) if hasattr(faiss, "get_num_gpus") else 0
    except Exception:  # noqa: BLE001
        info["faiss_gpus"] = None
    # the project's own packages and every CLI command module (import errors show up here first)
    info["project_imports"] = {m: _try_version(m) for m in ("clim_fast.training.loop", "clim_fast.mining.engine", "shards",
                                                            "dali_pipelines.pretrain", "cli.app")}
    if shutil.which("nvidia-smi"):
        q = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=30)
        info["nvidia_smi"] = q.stdout.strip() or q.stderr.strip()
    Path(args.out).write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps(info, indent=2))
    return 0


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10)
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
        if out.returncode == 0:
            return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown (no .git here: pass COMMIT=...)"


# ---------------------------------------------------------------------------------------------
# photos: make_photo_folder in parallel (one call per process, distinct seeds, then merged)

def _photo_part(job):
    from photos import make_photo_folder

    part_root, classes, per_class, seed, side, imagenet_like = job
    from photos import IMAGENET_LIKE

    jpeg = {k: v for k, v in IMAGENET_LIKE.items() if k != "side_range"} if imagenet_like else {}
    make_photo_folder(part_root, classes=classes, per_class=per_class, seed=seed, side_range=tuple(side), **jpeg)
    return part_root


def cmd_photos(args) -> int:
    root = Path(args.root)
    if root.exists() and any(root.iterdir()):
        print(f"{root}: not empty, reusing it")
    t0 = time.perf_counter()
    procs = max(1, min(args.procs, args.per_class))
    shares = [args.per_class // procs + (1 if i < args.per_class % procs else 0) for i in range(procs)]
    tmp = Path(tempfile.mkdtemp(prefix="photos-parts-", dir=root.parent if root.parent.exists() else None))
    jobs = [(str(tmp / f"p{i}"), args.classes, n, args.seed * 1000 + i, args.side, args.imagenet_like)
            for i, n in enumerate(shares) if n]
    with ProcessPoolExecutor(len(jobs)) as pool:
        parts = list(pool.map(_photo_part, jobs))
    count, total_bytes = 0, 0
    for i, part in enumerate(parts):
        for cls in sorted(Path(part).iterdir()):
            dest = root / cls.name
            dest.mkdir(parents=True, exist_ok=True)
            for f in sorted(cls.iterdir()):
                target = dest / f"{f.stem}_p{i:02d}{f.suffix}"
                f.replace(target)
                count += 1
                total_bytes += target.stat().st_size
    shutil.rmtree(tmp, ignore_errors=True)
    seconds = time.perf_counter() - t0
    result = {"images": count, "classes": args.classes, "side_range": list(args.side),
              "mean_kb": round(total_bytes / max(count, 1) / 1024, 1), "seconds": round(seconds, 2),
              "procs": len(jobs)}
    print(json.dumps(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0 if count == args.classes * args.per_class else 1


# ---------------------------------------------------------------------------------------------
# wait-train: block until the run's log shows a step of epoch >= E (after a mining record)

def cmd_wait_train(args) -> int:
    """0: condition met (caller sends SIGTERM); 3: the process ended first; 2: timed out."""
    log, deadline = Path(args.log), time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        records = _read_jsonl(log)
        mined = any(r.get("kind") == "mine" for r in records)
        steps = [r for r in records if r.get("kind") == "step" and r.get("epoch", -1) >= args.min_epoch]
        if steps and (mined or not args.need_mine):
            print(f"wait-train: epoch {steps[-1]['epoch']} step {steps[-1]['step']} logged, mining seen: {mined}")
            return 0
        if not _alive(args.pid):
            print("wait-train: the training process ended before the condition")
            return 3
        time.sleep(args.poll)
    print(f"wait-train: timed out after {args.timeout} s")
    return 2


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (ended, not yet reaped by the shell) counts as ended
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def _read_jsonl(path: Path) -> list[dict]:
    out = []
    try:
        for line in path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                pass  # a line being written
    except OSError:
        pass
    return out


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        return {"missing": f"{path.name}: {type(e).__name__}"}


# ---------------------------------------------------------------------------------------------
# combine

def junit_summary(path: Path) -> dict:
    if not path.is_file():
        return {"missing": path.name}
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        return {"unreadable": str(e)}
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    totals = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    totals["seconds"] = round(sum(float(s.get("time", 0)) for s in suites), 2)
    cases = []
    for case in root.iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        outcome = "passed"
        for tag in ("failure", "error", "skipped"):
            el = case.find(tag)
            if el is not None:
                outcome = tag
                msg = (el.get("message") or el.text or "").strip().splitlines()
                cases.append({"test": name, "outcome": outcome, "message": msg[0][:300] if msg else "",
                              "seconds": float(case.get("time", 0))})
                break
        if outcome == "passed":
            cases.append({"test": name, "outcome": "passed", "seconds": float(case.get("time", 0))})
    totals["passed"] = sum(c["outcome"] == "passed" for c in cases)
    totals["cases"] = cases
    return totals


def train_summary(run: Path, phases: dict) -> dict:
    records = _read_jsonl(run / "log.jsonl")
    if not records:
        return {"missing": "log.jsonl"}
    config = _read_json(run / "config.json")
    epochs = [r for r in records if r.get("kind") == "epoch"]
    mines = [r for r in records if r.get("kind") == "mine"]
    pre = [r for r in records if r.get("kind") == "preempted"]
    steps = [r for r in records if r.get("kind") == "step"]
    want = config.get("epochs") if isinstance(config, dict) else None
    done = sorted({r["epoch"] for r in epochs})
    # resume: step records after the (first) preempted record continue its iteration count
    cut = records.index(pre[0]) if pre else len(records)
    after = [r for r in records[cut + 1:] if r.get("kind") == "step"]
    iters = [r["iteration"] for r in steps]
    resumed_ok = bool(pre and after and after[0]["iteration"] > pre[0]["iteration"]
                      and all(b > a for a, b in zip(iters, iters[1:])))
    keep = ("anchors_per_s", "data_wait", "step_time_s", "loss", "gpu_mem_gb", "first_batch_wait_s")
    summary = {
        "config": {k: config.get(k) for k in ("preset", "arch", "image_size", "batch_size", "epochs",
                                               "clim_start_epoch", "mine_every", "clusters", "knn_k",
                                               "mine_engine", "queue_size", "workers", "dali_threads",
                                               "precision", "multires")} if isinstance(config, dict) else config,
        "phases": phases,
        "epochs_logged": done,
        "all_epochs_done": want is not None and done == list(range(want)),
        "mining_rounds": [{k: m.get(k) for k in ("epoch", "engine", "feature_s", "feature_first_batch_s", "kmeans_s", "knn_s", "select_s", "exchange_s",
                                                  "pickup_s", "round_s", "num_samples",
                                                  "clusters", "k", "mean_positives", "fallback_share",
                                                  "label_purity", "label_chance")} for m in mines],
        "preempted": [{k: p.get(k) for k in ("epoch", "step", "iteration", "signal")} for p in pre],
        # what a checkpoint costs the loop (the snapshot; the write runs in the background)
        "checkpoints": [{k: c.get(k) for k in ("epoch", "step", "blocking_s")}
                        for c in records if c.get("kind") == "checkpoint"],
        "checkpoints_written": [{k: c.get(k) for k in ("epoch", "step", "write_s")}
                                for c in records if c.get("kind") == "checkpoint_written"],
        "resumed_where_it_stopped": resumed_ok,
        "steps_after_resume": len(after),
        "per_epoch": [{"epoch": r["epoch"], **{k: r.get(k) for k in keep}} for r in epochs],
        "final_checkpoint_exists": (run / "checkpoints" / "last.pt").is_file(),
        "tables": sorted(p.name for p in (run / "tables").glob("*.npz")) if (run / "tables").is_dir() else [],
    }
    # the steady state: every epoch but the first one of each process (pipeline build, cuDNN
    # autotuning); an epoch's throughput meter starts after its mining round, so those stay in
    first_after = next((r for r in records[cut + 1:] if r.get("kind") == "epoch"), None)
    steady = [r for r in epochs[1:] if r is not first_after]
    if steady:
        summary["steady_anchors_per_s"] = round(sum(r["anchors_per_s"] for r in steady) / len(steady), 1)
        summary["steady_data_wait_share"] = round(max(r["data_wait"] for r in steady), 4)
        # an epoch's first batch against its own mean step (the first-batch wait of an epoch that
        # follows a mining round is the round's pickup, reported with the round)
        after_round = {m.get("epoch") for m in mines}
        bounds = [r["first_batch_wait_s"] / r["step_time_s"] for r in steady
                  if r.get("step_time_s") and r.get("first_batch_wait_s") is not None and r["epoch"] not in after_round]
        if bounds:
            summary["epoch_boundary_in_steps_max"] = round(max(bounds), 3)
    summary["ok"] = bool(summary["all_epochs_done"] and mines and pre and summary["final_checkpoint_exists"]
                         and all(p.get("rc") == 0 for p in phases.values() if isinstance(p, dict)))
    return summary


def targets(results: dict, full: bool) -> dict:
    """Measured figures next to the targets in docs/benchmarks.md; `met` is None where the check could not say."""
    out = {}
    ts = results.get("train_step", {})
    runs = {r.get("preset"): r for r in ts.get("runs", []) if "variant" not in r and "loader" not in r} \
        if isinstance(ts, dict) else {}
    for preset, row in runs.items():
        if "real" in row:
            out[f"real_over_synthetic_{preset}"] = _row(row.get("real_over_synthetic"),
                                                      TARGETS["real_over_synthetic_min"], ">=", full)
            out[f"bench_data_wait_share_{preset}"] = _row(row["real"].get("data_wait_share"),
                                                        TARGETS["data_wait_share_max"], "<=", full)
    small = results.get("train_step_small", {})
    for row in small.get("runs", []) if isinstance(small, dict) else []:
        if "real" in row and "loader" not in row:
            out[f"small_images_data_wait_share_{row['preset']}"] = _row(
                row["real"].get("data_wait_share"), TARGETS["small_images_data_wait_share_max"], "<=", full)
    if "clim_multires" in runs and "real" in runs["clim_multires"]:
        out["clim_multires_real_anchors_per_s"] = _row(runs["clim_multires"]["real"].get("anchors_per_s"),
                                                       TARGETS["clim_multires_anchors_per_s_min"], ">=", full)
    comp = results.get("train_step_compile", {})
    for row in comp.get("runs", []) if isinstance(comp, dict) else []:
        if row.get("variant") == "compile" and "synthetic" in row:
            out["clim_multires_compiled_synthetic_anchors_per_s"] = _row(
                row["synthetic"].get("anchors_per_s"), TARGETS["clim_multires_anchors_per_s_min"], ">=", full)
    tr = results.get("train", {})
    if isinstance(tr, dict) and "steady_data_wait_share" in tr:
        out["train_data_wait_share"] = _row(tr["steady_data_wait_share"], TARGETS["data_wait_share_max"], "<=", full)
    if isinstance(tr, dict) and "epoch_boundary_in_steps_max" in tr:
        out["train_epoch_boundary_in_steps"] = _row(tr["epoch_boundary_in_steps_max"],
                                                    TARGETS["epoch_boundary_steps_max"], "<=", full)
    mine = results.get("mine", {})
    for row in mine.get("results", []) if isinstance(mine, dict) else []:
        if row.get("n") == 1_280_000 and "total_s" in row.get("round", {}):
            out["mining_round_1.28M_s"] = _row(row["round"]["total_s"], TARGETS["mining_round_1.28M_max_s"],
                                              "<=", True)
    ref = {}
    arch = ts.get("arch", "?") if isinstance(ts, dict) else "?"
    if "moco_v2" in runs:
        ref[f"{arch}_moco_v2_step_anchors_per_s"] = runs["moco_v2"]["synthetic"]["anchors_per_s"]
    if "clim_multires" in runs:
        ref[f"{arch}_clim_multires_step_anchors_per_s (reference is clim, 2q 2k, no multires)"] = \
            runs["clim_multires"]["synthetic"]["anchors_per_s"]
    ld = results.get("loader", {})
    if isinstance(ld, dict) and "anchors_per_s" in ld:
        ref["dali_moco_v2_graph_anchors_per_s"] = ld["anchors_per_s"].get("dali_moco_v2")
        ref["dali_clim_positives_anchors_per_s"] = ld["anchors_per_s"].get("dali_clim_positives")
        ref["dali_centre_crops_images_per_s"] = ld["anchors_per_s"].get("dali_centre_crops")
        ref[f"torchvision_pil_{ld.get('workers')}_workers_anchors_per_s"] = ld["anchors_per_s"].get("torchvision_pil")
    for row in mine.get("results", []) if isinstance(mine, dict) else []:
        for name, entry in row.get("engines", {}).items():
            if "knn_s" in entry:
                ref[f"{name}_knn_s_n{row['n']}"] = entry["knn_s"]
        for part, value in row.get("round", {}).items():
            if isinstance(value, (int, float)):
                ref[f"round_{part}_n{row['n']}"] = value
    return {"targets": out, "measured_vs_reference": {"measured": ref, "reference_h200": REFERENCE},
            "comparable": full, "note": None if full else "SMALL=1 rehearsal on the CPU: figures are not comparable "
                                                          "with the targets in docs/benchmarks.md"}


def _row(value, limit, op, comparable):
    if value is None:
        return {"value": None, "target": f"{op} {limit}", "met": None}
    met = (value >= limit) if op == ">=" else (value <= limit)
    return {"value": round(float(value), 4), "target": f"{op} {limit}", "met": bool(met) if comparable else None}


def cmd_combine(args) -> int:
    work, out = Path(args.work), Path(args.out)
    history = _read_jsonl(work / "steps.jsonl")
    latest = {s["step"]: s for s in history}  # a rerun of a step replaces its earlier record
    steps = list(latest.values())
    meta = _read_json(work / "meta.json")
    full = not (isinstance(meta, dict) and meta.get("small"))
    results = {}
    if (work / "pytest.xml").exists() or any(s["step"] == "tests" for s in steps):
        results["tests"] = junit_summary(work / "pytest.xml")
        results["tests"]["deselected"] = _read_json(work / "deselected.json") if (work / "deselected.json").exists() else []
    for name in ("photos", "shard", "loader", "train_step", "train_step_small", "train_step_compile",
                 "train_step_compile_small", "step_overhead", "mine"):
        if (work / f"{name}.json").exists():
            results[name] = _read_json(work / f"{name}.json")
    if (work / "shards" / "manifest.json").exists():
        m = _read_json(work / "shards" / "manifest.json")
        results["shards"] = {"num_samples": m.get("num_samples"), "num_shards": len(m.get("shards", [])),
                             "dataset_id": m.get("dataset_id")}
    if (work / "run").is_dir():
        phases = _read_json(work / "train_phases.json") if (work / "train_phases.json").exists() else {}
        results["train"] = train_summary(work / "run", phases)
    doc = {"check": "clim-fast gpu_check", "meta": meta, "steps": steps,
           "reruns": len(history) - len(steps),
           "all_steps_ok": bool(steps) and all(s.get("rc") == 0 for s in steps),
           "results": results, **targets(results, full)}
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    tmp.replace(out)
    if args.print:
        print(json.dumps({"steps": [{k: s.get(k) for k in ("step", "rc", "seconds")} for s in steps],
                          "targets": doc["targets"]}, indent=1))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("meta")
    p.add_argument("out")
    p = sub.add_parser("photos")
    p.add_argument("root")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--per-class", type=int, default=400)
    p.add_argument("--side", type=int, nargs=2, default=(400, 500))
    p.add_argument("--procs", type=int, default=os.cpu_count() or 1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--imagenet-like", action="store_true", help="ImageNet's JPEG weight (~110 KB, grain, 4:4:4)")
    p.add_argument("--json")
    p = sub.add_parser("wait-train")
    p.add_argument("log")
    p.add_argument("--pid", type=int, required=True)
    p.add_argument("--min-epoch", type=int, default=2)
    p.add_argument("--need-mine", action="store_true")
    p.add_argument("--timeout", type=float, default=120)
    p.add_argument("--poll", type=float, default=0.2)
    p = sub.add_parser("combine")
    p.add_argument("work")
    p.add_argument("out")
    p.add_argument("--print", action="store_true")
    args = ap.parse_args()
    return {"meta": cmd_meta, "photos": cmd_photos, "wait-train": cmd_wait_train, "combine": cmd_combine}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
