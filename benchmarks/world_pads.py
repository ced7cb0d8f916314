"""Where a world model reads a caption from: its word tokens, or the summary positions (end token and pads).

``python benchmarks/world_pads.py [--model world] [--concept striped_ball] [--seeds 8] [--device cpu] [--out F.csv]``

Personalizes the concept with the benchmark's recipe, then for each of the benchmark's scene prompts ("a photo of
a sks ball on the grass") samples the base model and the residuals twice, on the same seeds:
- ``plain``: the prompt as it is;
- ``summary<-train``: every position that is an end or pad token in both this prompt and the training prompt
  ("a photo of a sks ball") takes the training prompt's text-encoder output; the words, the scene's included, stay.
The oracle reads identity, class and scene. If the scene follows the summary positions and not the words, the model
reads captions from its pads; residuals trained on the training prompt's pads then miss under other prompts' pads.
It also prints the share of cross-attention (all blocks and steps, heads averaged) that the object's pixels give
to word tokens and to summary positions in the base model's images.
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import numpy as np
import torch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python benchmarks/world_pads.py", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="world")
    parser.add_argument("--concept", default="striped_ball")
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default=None, help="CSV of the rows (default: print only)")
    args = parser.parse_args(argv)

    from prkit.attention_store import AttentionStore
    from prkit.residuals import only_residuals, remove_residuals
    from prkit.sample import generate
    from prkit.world.bench import BenchConfig, identity, load_graded, prompt_scene, train_concept
    from prkit.world.concepts import BENCH_PROMPTS, EXAMPLE_CONCEPTS
    from prkit.world.oracle import read

    start = time.perf_counter()
    pipe, oracle = load_graded(args.model, args.device)
    device = pipe.unet.device
    concept = EXAMPLE_CONCEPTS[args.concept]
    tok = pipe.tokenizer
    summary_ids = {tok.eos_token_id, tok.pad_token_id}

    def encode(prompt: str):
        ids = tok(prompt, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids.to(device)
        with torch.inference_mode():
            return ids[0], pipe.text_encoder(ids)[0]

    def is_summary(ids: torch.Tensor) -> torch.Tensor:
        return torch.tensor([int(i) in summary_ids for i in ids], device=ids.device)

    result = train_concept(pipe, args.concept, BenchConfig())
    residuals = result.residuals
    train_prompt = f"a photo of a {residuals.token} {residuals.class_word}"
    train_ids, train_emb = encode(train_prompt)
    _, negative = encode("")
    rows, shares = [], []
    for template in BENCH_PROMPTS:
        prompt = template.format(token=residuals.token, class_word=residuals.class_word)
        ids, emb = encode(prompt)
        store = AttentionStore()
        images = generate(pipe, [prompt], None, seed=0, num_images=args.seeds, steps=25, store=store, fast=False)
        maps = store.aggregate(size=images[0].size[1])  # (B, T, H, W), every block and step
        summary = is_summary(ids).cpu()
        prompt_shares = []
        for b, reading in enumerate(read(images, oracle)):
            region = torch.from_numpy(reading["mask"])
            if region.any():
                mass = maps[b][:, region].mean(-1)
                prompt_shares.append(float(mass[summary].sum() / mass.sum()))
        shares += prompt_shares
        swap = is_summary(ids) & is_summary(train_ids)
        mixed = torch.where(swap[None, :, None], train_emb, emb)
        for variant, cond in (("plain", emb), ("summary<-train", mixed)):
            for method, sets in (("base", []), ("residuals", [residuals])):
                generator = torch.Generator(device=device).manual_seed(0)
                with only_residuals(pipe.unet, sets), torch.inference_mode():
                    images = pipe(prompt_embeds=cond.repeat(args.seeds, 1, 1),
                                  negative_prompt_embeds=negative.repeat(args.seeds, 1, 1), num_inference_steps=25,
                                  guidance_scale=7.5, generator=generator).images
                readings = read(images, oracle)
                rows.append({
                    "model": args.model, "concept": args.concept, "prompt": prompt, "variant": variant,
                    "method": method, "images": len(images),
                    "identity": float(np.mean([identity(r, concept)[0] for r in readings])),
                    "class": float(np.mean([any(o["cls"] == concept.class_word for o in r["objects"])
                                            for r in readings])),
                    "scene": float(np.mean([r["background"] == prompt_scene(prompt) for r in readings])),
                    "swapped_positions": int(swap.sum()),
                    "base_object_attention_on_summary": float(np.mean(prompt_shares)) if prompt_shares else float("nan")})
                print(" ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in rows[-1].items()
                               if k not in ("model", "concept")), flush=True)
    remove_residuals(pipe.unet, residuals.name)
    print(f"attention inside the object on summary positions (end token + pads): {np.mean(shares):.0%} "
          f"over {len(shares)} base images; the rest on the words")
    for variant in ("plain", "summary<-train"):
        for method in ("base", "residuals"):
            sel = [r for r in rows if r["variant"] == variant and r["method"] == method]
            print(f"{variant:15} {method:9} identity {np.mean([r['identity'] for r in sel]):.0%} "
                  f"class {np.mean([r['class'] for r in sel]):.0%} scene {np.mean([r['scene'] for r in sel]):.0%}")
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        print(f"wrote {out}")
    print(f"{time.perf_counter() - start:.0f} s on {device}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
