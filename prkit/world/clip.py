"""The world's CLIP: a small transformers ``CLIPModel`` trained contrastively on world renders and captions.

It ships in ``prkit/world/clip/`` (model + the world tokenizer) so that CLIP-I and CLIP-T on the embedded world
go through the very same code path as on real models (``prkit.metrics.load_clip("world")``).

``python -m prkit.world.clip --out DIR [--minutes 2.5] [--device cuda] [--ship]``: render a captioned pool
(half the objects patterned, captions naming them; 30% of captions drop colours and patterns, as the
metric's prompts without the identifier do), train with the symmetric InfoNCE loss, report image->text
retrieval accuracy on fresh renders, save fp16.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ..metrics import CLIP_MEAN, CLIP_STD
from .vocab import COLOR_NAMES, PATTERN_WORDS

log = logging.getLogger(__name__)

CLIP_DIR = Path(__file__).parent / "clip"
_COLOR = "|".join(COLOR_NAMES)
_PLAIN = re.compile(rf"\b(?:{_COLOR}) and (?:{_COLOR}) (?:{'|'.join(PATTERN_WORDS.values())}) |\b(?:{_COLOR}) ")


@dataclass
class ClipRecipe:
    seed: int = 0
    n_images: int = 200_000
    chunk: int = 2_000
    workers: int = 16
    minutes: float = 2.5
    steps: int | None = None  # None: as many as fit in minutes
    batch: int = 512
    lr: float = 5e-4
    warmup: int = 200
    weight_decay: float = 0.1
    plain_captions: float = 0.3  # share of captions with colours and patterns removed
    eval_n: int = 1000


def build_clip(tokenizer):
    """A CLIPModel for 64x64 images: ViT (patch 8, width 128, 3 layers) and a 2-layer text tower of width 128
    (1.2 M parameters, 2.3 MB in fp16: the model, oracle and CLIP together stay under the 30 MB budget)."""
    from transformers import CLIPConfig, CLIPModel

    text = dict(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=512, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=32, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    vision = dict(image_size=64, patch_size=8, hidden_size=128, intermediate_size=512, num_hidden_layers=3,
                  num_attention_heads=4)
    return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=128))


def plain_caption(text: str) -> str:
    """'a red and white striped ball on the grass' -> 'a ball on the grass' (article fixed)."""
    out = _PLAIN.sub("", text)
    return re.sub(r"\ban (?=[^aeiou\s])", "a ", re.sub(r"\ba (?=[aeiou])", "an ", out))


def to_pixels(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (N, 64, 64, 3) -> normalized (N, 3, 64, 64) float on the same device, as ``prkit.metrics``
    prepares 64x64 images."""
    images = images if isinstance(images, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(images))
    x = images.permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(CLIP_MEAN, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / torch.tensor(CLIP_STD, device=x.device).view(1, 3, 1, 1)


def retrieval_accuracy(model, tokenizer, images: np.ndarray, captions: list[str], device, group: int = 100) -> float:
    """Image -> text top-1 accuracy within groups of ``group`` (image, caption) pairs."""
    hits = 0
    model.eval()
    with torch.no_grad():
        for i in range(0, len(captions) - group + 1, group):
            tok = tokenizer(captions[i:i + group], padding=True, return_tensors="pt").to(device)
            out = model(input_ids=tok.input_ids, attention_mask=tok.attention_mask,
                        pixel_values=to_pixels(images[i:i + group]).to(device))
            hits += int((out.logits_per_image.argmax(1).cpu() == torch.arange(group)).sum())
    return hits / (len(captions) // group * group)


def train_clip(recipe: ClipRecipe, device: torch.device) -> tuple[object, object, dict]:
    """Render the pool, train the CLIP; returns (model, tokenizer, info)."""
    from transformers import CLIPTokenizer

    from .build_tokenizer import TOKENIZER_DIR
    from .pool import render_pool

    t0 = time.perf_counter()
    torch.manual_seed(recipe.seed)
    tok = CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR))
    images, caps = render_pool(recipe.seed, 5, recipe.n_images, recipe.chunk, 0.5, recipe.workers)
    rng = np.random.default_rng(recipe.seed)
    caps = [plain_caption(c) if rng.random() < recipe.plain_captions else c for c in caps]
    ids = tok(caps, padding="max_length", max_length=32, truncation=True, return_tensors="pt")
    pool = torch.from_numpy(images).to(device)
    input_ids, mask = ids.input_ids.to(device), ids.attention_mask.to(device)
    render_s = time.perf_counter() - t0
    model = build_clip(tok).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    gen = torch.Generator(device=device).manual_seed(recipe.seed)
    amp = torch.autocast("cuda", torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    deadline = time.perf_counter() + recipe.minutes * 60
    step, losses = 0, []
    # at least one step: a time shorter than the first one trained none, and failed on the unset loss below
    while (recipe.steps is None and (step == 0 or time.perf_counter() < deadline)) or (
            recipe.steps is not None and step < recipe.steps):
        for g in opt.param_groups:
            g["lr"] = recipe.lr * min(1.0, (step + 1) / recipe.warmup)
        idx = torch.randint(0, len(pool), (recipe.batch,), device=device, generator=gen)
        with amp:  # no flips: captions say left/right by word order
            out = model(input_ids=input_ids[idx], attention_mask=mask[idx], pixel_values=to_pixels(pool[idx]),
                        return_loss=True)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, 4.6052)
        if step % 200 == 0:
            losses.append(out.loss.item())
            log.info("clip step %d loss %.4f (%.0fs)", step, losses[-1], time.perf_counter() - t0)
        step += 1
    eval_imgs, eval_caps = render_pool(recipe.seed + 1, 6, recipe.eval_n, recipe.eval_n, 0.5, 0)
    info = {"steps": step, "batch": recipe.batch, "render_seconds": render_s, "seconds": time.perf_counter() - t0,
            "loss_last": out.loss.item(), "losses": losses,
            "retrieval_top1_of_100": retrieval_accuracy(model, tok, eval_imgs, eval_caps, device),
            "retrieval_top1_of_100_plain": retrieval_accuracy(model, tok, eval_imgs,
                                                              [plain_caption(c) for c in eval_caps], device),
            "recipe": asdict(recipe), "card": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"}
    return model.eval(), tok, info


def save_clip(model, tokenizer, folder: Path, info: dict | None = None) -> Path:
    """Save the CLIP (fp16) and the tokenizer as a folder ``transformers``/``prkit.metrics`` load."""
    folder = Path(folder)
    if folder.exists():
        shutil.rmtree(folder)
    model.to(torch.float16).save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    if info is not None:
        (folder / "prkit_clip.json").write_text(json.dumps(info, indent=1, default=str) + "\n")
    return folder


def main(argv: list[str] | None = None) -> int:
    from ..cli_args import _positive_int, _whole

    ap = argparse.ArgumentParser(prog="python -m prkit.world.clip", description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--minutes", type=float, default=ClipRecipe.minutes)
    ap.add_argument("--steps", type=_positive_int, default=None)
    ap.add_argument("--n-images", type=_positive_int, default=ClipRecipe.n_images)
    ap.add_argument("--batch", type=_positive_int, default=ClipRecipe.batch)
    ap.add_argument("--workers", type=int, default=ClipRecipe.workers)
    ap.add_argument("--eval-n", type=_whole(100), default=ClipRecipe.eval_n,
                    help="fresh renders to grade retrieval on, in groups of 100 (at least 100)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--ship", action="store_true", help=f"copy the result to {CLIP_DIR}")
    args = ap.parse_args(argv)
    if args.steps is None and not 0 < args.minutes < float("inf"):  # nan trained no step, then failed on the loss
        ap.error(f"--minutes {args.minutes}: must be a finite number above 0 (or give --steps)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)
    from ..pipeline import resolve_device

    recipe = ClipRecipe(minutes=args.minutes, steps=args.steps, n_images=args.n_images, batch=args.batch,
                        workers=args.workers, eval_n=args.eval_n)
    model, tok, info = train_clip(recipe, resolve_device(args.device))
    save_clip(model, tok, args.out / "clip", info)
    if args.ship:
        shutil.copytree(args.out / "clip", CLIP_DIR, dirs_exist_ok=True)
    print(json.dumps({k: v for k, v in info.items() if k != "losses"}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
