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


def timed(cmd: list[str], log: Path) -> float:
    start = time.perf_counter()
    with open(log, "w") as f:
        subprocess.run(cmd, check=True, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--gpus", type=int, default=2)
    ap.add_argument("--subjects", type=int, default=4)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--images-per-prompt", type=int, default=2)
    ap.add_argument("--methods", nargs="+", default=["residuals", "lora"])
    ap.add_argument("--json", type=Path, default=None, help="where to write the result (default: OUT/scale.json)")
    args = ap.parse_args(argv)
    out = args.out
    t = time.perf_counter()
    model = build_pipeline(out / "sd15_random")
    data = build_subjects(out / "data", args.subjects, args.prompts)
    prep = time.perf_counter() - t
    common = ["-m", "prkit.evaluate", "--protocol", "customconcept101", "--data", str(data), "--model", str(model),
              "--methods", *args.methods, "--clip", "none", "--dino", "none",
              "--images-per-prompt", str(args.images_per_prompt)]
    one = timed([sys.executable, *common, "--out", str(out / "run_1gpu")], out / "log_1gpu.txt")
    many = timed([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.gpus}",
                  *common, "--out", str(out / f"run_{args.gpus}gpu")], out / f"log_{args.gpus}gpu.txt")
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
        "torch": torch.__version__,
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
