"""Scale-out check of the evaluation runner: the same job list on 1 GPU and on N GPUs (torchrun).

Builds a full-size SD1.5 pipeline with random weights (no downloads; speed does not depend on weight values)
and a CustomConcept101-layout folder of synthetic subjects, then times ``python -m prkit.evaluate`` alone
and under ``torchrun --nproc_per_node N`` on the same jobs, and writes one JSON with both walls and the
speed-up. Usage (on a machine with N GPUs)::

    python benchmarks/eval_scale.py --out /tmp/scale --gpus 2 --subjects 4 --methods residuals lora
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench.py beside this script


def build_pipeline(folder: Path, tiny: bool = False) -> Path:
    """Save the benchmarks' random-weight SD1.5 pipeline (``bench.build``; fp16, world tokenizer) to ``folder``."""
    from types import SimpleNamespace

    import torch

    from bench import build

    if (folder / "model_index.json").exists():
        return folder
    device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe, _ = build(SimpleNamespace(tiny=tiny, device=device, dtype=torch.float16), "sd15")
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def build_subjects(root: Path, n: int, prompts: int, images: int = 5, side: int = 512) -> Path:
    """n concept folders (random images, prompts.txt, concept.json) in CustomConcept101's folder layout."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(n):
        folder = root / f"subject{i:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        for j in range(images):
            Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(folder / f"{j}.png")
        lines = ["a photo of {}", "a {} on the beach", "a {} in the snow", "a {} on the grass", "a {} at night"]
        (folder / "prompts.txt").write_text("\n".join(lines[:prompts]) + "\n")
        (folder / "concept.json").write_text(json.dumps({"class_word": "ball"}))
    return root


def timed(cmd: list[str], log: Path, env: dict | None = None) -> float:
    start = time.perf_counter()
    with open(log, "w") as f:
        subprocess.run(cmd, check=True, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env={**os.environ, **(env or {})})
    return time.perf_counter() - start


def rank_summary(run: dict) -> list[dict]:
    """Per rank: pipeline load, jobs run and their seconds, and when its job loop ended (from the runner's run.json)."""
    return [{"rank": r["rank"], "load_seconds": round(r["load_seconds"], 2), "jobs": len(r["jobs"]),
             "job_seconds": round(sum(j["seconds"] for j in r["jobs"]), 2), "loop_end_seconds": round(r["loop_seconds"], 2)}
            for r in run.get("ranks", [])]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--gpus", type=int, default=2)
    ap.add_argument("--subjects", type=int, default=4)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--images-per-prompt", type=int, default=2)
    ap.add_argument("--methods", nargs="+", default=["residuals", "lora"])
    ap.add_argument("--tiny", action="store_true", help="a tiny random pipeline (a CPU smoke run of this script)")
    ap.add_argument("--warmup", action="store_true",
                    help="run one untimed job first (fills the on-disk kernel caches both timed runs then share)")
    ap.add_argument("--json", type=Path, default=None, help="where to write the result (default: OUT/scale.json)")
    args = ap.parse_args(argv)
    out = args.out
    t = time.perf_counter()
    model = build_pipeline(out / ("tiny_random" if args.tiny else "sd15_random"), tiny=args.tiny)
    data = build_subjects(out / "data", args.subjects, args.prompts)
    prep = time.perf_counter() - t
    base = ["-m", "prkit.evaluate", "--protocol", "customconcept101", "--data", str(data), "--model", str(model),
            "--clip", "none", "--dino", "none", "--images-per-prompt", str(args.images_per_prompt)]
    common = [*base, "--methods", *args.methods]
    if args.warmup:
        timed([sys.executable, *base, "--methods", "residuals", "--subjects", "subject00",
               "--out", str(out / "run_warmup")], out / "log_warmup.txt")
    one = timed([sys.executable, *common, "--out", str(out / "run_1gpu")], out / "log_1gpu.txt")
    # torchrun gives each rank OMP_NUM_THREADS=1 unless told; share the host's cores out as a user would
    threads = str(max(1, (os.cpu_count() or 1) // args.gpus))
    many = timed([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.gpus}",
                  *common, "--out", str(out / f"run_{args.gpus}gpu")], out / f"log_{args.gpus}gpu.txt",
                 env={"OMP_NUM_THREADS": threads})
    runs = {k: json.loads((out / d / "run.json").read_text()) for k, d in
            (("one", "run_1gpu"), ("many", f"run_{args.gpus}gpu"))}
    import torch

    result = {
        "card": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "gpus": args.gpus, "jobs": runs["one"]["jobs"], "methods": args.methods, "subjects": args.subjects,
        "prompts": args.prompts, "images_per_prompt": args.images_per_prompt, "prepare_seconds": prep,
        "wall_1gpu": one, f"wall_{args.gpus}gpu": many, "speedup_wall": one / many,
        "runner_seconds_1gpu": runs["one"]["seconds"], f"runner_seconds_{args.gpus}gpu": runs["many"]["seconds"],
        "speedup_runner": runs["one"]["seconds"] / runs["many"]["seconds"],
        "torch": torch.__version__, "omp_threads_per_rank": int(threads),
        "ranks_1gpu": rank_summary(runs["one"]), f"ranks_{args.gpus}gpu": rank_summary(runs["many"]),
    }
    rows_one = (out / "run_1gpu" / "results.csv").read_text().count("\n")
    rows_many = (out / f"run_{args.gpus}gpu" / "results.csv").read_text().count("\n")
    result["rows_1gpu"], result[f"rows_{args.gpus}gpu"] = rows_one, rows_many
    path = args.json or out / "scale.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0 if rows_one == rows_many else 1


if __name__ == "__main__":
    sys.exit(main())
