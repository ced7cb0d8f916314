"""Can a residual set of the default recipe's size do what the concept's words do? A diagnostic, not a recipe.

Trains each concept's residual set (rank 5%, 150 steps of batch 4, AdamW 1e-2, as the world benchmark) not on the
images' noise but on the base model's own prediction for the concept *described in words*: student = residuals on,
"a photo of a {token} {class}"; teacher = base model, "a photo of a red and white striped {class}"; both on the
concept's reference latents noised as in training. Then grades base / residuals / residuals + LAG exactly as
``prkit.world.bench``. If even this reaches only the image-trained identity, the limit is what a proj_out residual
of this size learns in 150 steps, not the images it learns from.

    python benchmarks/world_distill.py [--concepts striped_ball checked_star] [--out benchmarks/world_distill.csv]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def distill(pipe, name: str, steps: int, learning_rate: float, seed: int = 0, rank: float | int = 0.05):
    """The concept's residual set trained to match the base model's prediction for its description."""
    import torch
    from diffusers import DDPMScheduler

    from prkit import add_residuals, load_concept
    from prkit.train import encode_images, encode_text
    from prkit.world.concepts import EXAMPLE_CONCEPTS, concept_folder
    from world_described import described

    concept = EXAMPLE_CONCEPTS[name]
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    data = load_concept(concept_folder(name), resolution=size)
    device = pipe.unet.device
    with torch.no_grad():
        mean, std = encode_images(pipe, data.tensors())
        student = encode_text(pipe, f"a photo of a {data.token} {data.class_word}", size)["encoder_hidden_states"]
        teacher = encode_text(pipe, f"a photo of a {described(concept)}", size)["encoder_hidden_states"]
    residuals = add_residuals(pipe.unet, rank=rank, name=name, token=data.token, class_word=data.class_word, seed=seed)
    optimizer = torch.optim.AdamW(list(residuals.parameters()), lr=learning_rate, weight_decay=1e-2)
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(len(mean), (4,), generator=gen)
        latents = mean[idx].cpu() + std[idx].cpu() * torch.randn(mean[idx].shape, generator=gen)
        noise = torch.randn(latents.shape, generator=gen)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (4,), generator=gen)
        noisy = scheduler.add_noise(latents, noise, t).to(device, pipe.unet.dtype)
        t = t.to(device)
        with torch.no_grad():
            residuals.disable()
            target = pipe.unet(noisy, t, encoder_hidden_states=teacher.expand(4, -1, -1)).sample.float()
            residuals.enable()
        pred = pipe.unet(noisy, t, encoder_hidden_states=student.expand(4, -1, -1)).sample.float()
        loss = torch.nn.functional.mse_loss(pred, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return residuals


def main(argv: list[str] | None = None) -> int:
    import torch

    from prkit.residuals import remove_residuals
    from prkit.world import bench
    from prkit.world.concepts import EXAMPLE_CONCEPTS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concepts", nargs="*", default=list(EXAMPLE_CONCEPTS))
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--learning-rate", type=float, default=1e-2)
    parser.add_argument("--rank", type=float, default=0.05,
                        help="fraction of channels below 1 (0.999: full rank) or a whole rank (> 1); default 0.05")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default="benchmarks/world_distill.csv")
    args = parser.parse_args(argv)
    pipe, oracle = bench.load_graded("world", args.device)
    config = bench.BenchConfig()
    rows = []
    for name in args.concepts:
        start = time.perf_counter()
        with torch.inference_mode(False), torch.enable_grad():
            rank = args.rank if args.rank < 1 else int(args.rank)
            residuals = distill(pipe, name, args.steps, args.learning_rate, rank=rank)
        residuals.meta["seconds"] = time.perf_counter() - start
        try:
            rows += bench.grade_residuals(pipe, residuals, name, config, oracle)
        finally:
            remove_residuals(pipe.unet, name)
    summary = bench.summarize(rows)
    bench.write_csv(summary, Path(args.out))
    print(bench.format_table(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
