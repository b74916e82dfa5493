"""The real-shaped models on this machine's CPU: one B² stage each, seconds and peak memory against the prediction.

Tiny test models cannot catch what only the real shapes have (the real module names LoRA targets, attention at
real widths, dtype paths); this runs one B² stage of each family whose real shape fits a 24 GB machine, with
random weights at a reduced resolution, LoRA and bf16 (the CPU has AVX-512 BF16), through `cost.py` in a fresh
process each (so each peak is its own), and sets the measured peak resident memory beside
`memory_model.py`'s prediction for the same settings.

    python benchmarks/real_shapes.py --out benchmarks/results/real_shapes_cpu.json
    python benchmarks/real_shapes.py --runs sd15 --out benchmarks/results/real_shapes_cpu.json   # redo one run
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import memory_model  # noqa: E402

HERE = Path(__file__).resolve().parent
# one stage: 2 prompts x 2 branches, 6 steps with the last 3 trained, one training call of `rows` samples
STAGE = ["--methods", "b2", "--num-steps", "6", "--interval", "3", "--prompts", "2", "--branches", "2",
         "--reward", "random", "--inner-epochs", "1"]
# name: (cost.py's model flags, memory_model shape, resolution, dtype, train batch, steps per forward, checkpointing)
RUNS = {
    "sd15": (["--sd15-random"], "sd15", 256, "bf16", 2, 2, False),
    "sd15_fp32": (["--sd15-random"], "sd15", 256, "fp32", 2, 2, False),
    "sdxl": (["--sdxl-random"], "sdxl", 512, "bf16", 1, 1, False),
    "sd35m_no_t5": (["--sd3-random", "--no-t5"], "sd35m_no_t5", 256, "bf16", 1, 1, False),
    "sd35m_no_t5_gc": (["--sd3-random", "--no-t5"], "sd35m_no_t5", 256, "bf16", 2, 2, True),
}


def run(name: str, threads: int) -> dict:
    flags, shape, resolution, dtype, batch, per_forward, checkpointing = RUNS[name]
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "cost.json"
        command = [sys.executable, str(HERE / "cost.py"), *flags, "--resolution", str(resolution), *STAGE,
                   "--mixed-precision", {"fp32": "no"}.get(dtype, dtype), "--train-batch-size", str(batch),
                   "--timesteps-per-forward", str(per_forward), "--threads", str(threads), "--device", "cpu",
                   "--out", str(out)] + (["--gradient-checkpointing"] if checkpointing else [])
        start = time.time()
        done = subprocess.run(command, capture_output=True, text=True)
        seconds = time.time() - start
        if done.returncode != 0:
            return {"name": name, "error": done.stderr[-2000:], "returncode": done.returncode}
        measured = json.loads(out.read_text())["methods"]["b2"]
    predicted = memory_model.predict(shape, resolution, batch * per_forward, dtype, True, checkpointing)
    return {
        "name": name, "shape": shape, "resolution": resolution, "dtype": dtype, "train_batch_size": batch,
        "timesteps_per_forward": per_forward, "gradient_checkpointing": checkpointing,
        "stage_seconds": measured["seconds"]["total"], "sampling_seconds": measured["seconds"]["sampling"],
        "training_seconds": measured["seconds"]["training"], "wall_seconds": round(seconds, 1),
        # the stage's own peak (resident memory sampled while it ran), and the process's, which also holds the
        # building of the random weights in float32 before they are cast
        "peak_rss_gib": round(measured["peak_memory_bytes"]["step"] / memory_model.GiB, 2),
        "peak_sampling_gib": round(measured["peak_memory_bytes"]["sampling"] / memory_model.GiB, 2),
        "peak_training_gib": round((measured["peak_memory_bytes"]["training"] or 0) / memory_model.GiB, 2),
        "process_max_rss_gib": round(measured["process_max_rss_bytes"] / memory_model.GiB, 2),
        "predicted": predicted,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="*", default=list(RUNS), choices=list(RUNS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    # the runs are child processes: the threads they ran with are --threads, not this process's
    machine = {**common.machine_description(shared_cpu=True), "torch_threads": args.threads}
    # the runs already in --out that this call does not redo stay, each with the machine it ran on
    earlier = json.loads(Path(args.out).read_text())["runs"] if args.out and Path(args.out).exists() else []
    kept = [r for r in earlier if r["name"] not in args.runs]
    results = []
    for name in args.runs:
        result = {**run(name, args.threads), "machine": machine}
        results.append(result)
        if "error" in result:
            print(f"{name}: failed ({result['returncode']}): {result['error'][-300:]}", flush=True)
            continue
        print(f"{name:16} {result['resolution']} px {result['dtype']}: stage {result['stage_seconds']:7.1f} s, peak "
              f"{result['peak_rss_gib']:5.1f} GiB (training {result['peak_training_gib']:5.1f}, process "
              f"{result['process_max_rss_gib']:5.1f}), predicted {result['predicted']['total_gib']:5.1f} GiB",
              flush=True)
        if args.out:
            common.write_json(args.out, {"machine": machine, "runs": kept + results})
    return results


if __name__ == "__main__":
    main()
