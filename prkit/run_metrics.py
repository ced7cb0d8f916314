"""CLIP-I, CLIP-T and DINO for one run's residuals on any model: the metrics notebook's table for concepts the world's
oracle does not know (a real model's photos). Samples base / residuals / residuals + LAG on the same seeds and scores
them as ``prkit eval`` does (``eval_scorer.Scorer``, the DreamBooth protocol's metrics), without training anything.
"""

from __future__ import annotations

from .eval_results import format_table, summarize

# DreamBooth-style recontextualization prompts ("{}" is "<token> <class word>")
PROMPTS = ("a photo of a {}", "a {} in the jungle", "a {} in the snow", "a {} on the beach",
           "a {} on a cobblestone street", "a {} on top of pink fabric", "a {} on top of a wooden floor",
           "a {} with a city in the background")
METHODS = ("base", "residuals", "residuals+lag")


def score_residuals(pipe, residuals, concept, *, prompts=PROMPTS, images_per_prompt: int = 2, steps: int = 25,
                    seed: int = 0, clip: str | None = "auto", dino: str | None = "auto", download: bool = False,
                    train_seconds: float | None = None) -> tuple[list[dict], dict[str, str]]:
    """Rows (one per image and method, the harness's columns) and why a metric is unavailable (empty when all are).

    Args:
        pipe: the pipeline ``residuals`` live on.
        residuals: the run's set (its token and class word fill the prompts).
        concept: the run's ``prkit.data.Concept`` (its photos are CLIP-I's and DINO's references).
        prompts: templates with one ``{}`` for "<token> <class word>".
        clip, dino: hub ids or folders ("auto": CLIP ViT-B/32 and DINO ViT-S/16; None: off); read from the local
            cache unless ``download``.
    """
    from .eval_scorer import Scorer
    from .eval_subjects import Subject
    from .evaluate import EvalConfig
    from .sample import generate

    words = f"{residuals.token} {residuals.class_word}"
    prompts = (prompts,) if isinstance(prompts, str) else tuple(prompts)  # one template, not its letters
    bare = [p for p in prompts if "{}" not in p]
    if not prompts or bare:  # else LAG refused the prompt without the token, after the base images were made
        raise ValueError(f"score_residuals: prompts must be templates with {{}} where '{words}' goes (e.g. 'a {{}} "
                         f"on the beach'), got {bare[0]!r}" if bare else "score_residuals: prompts is empty")
    texts = [p.format(words) for p in prompts]
    subject = Subject(getattr(residuals, "name", "") or words, residuals.token, residuals.class_word, texts,
                      lambda resolution: concept)
    scorer = Scorer(EvalConfig(protocol="dreambooth", clip=clip, dino=dino, download_backbones=download),
                    pipe.unet.device, need_oracle=False)
    unavailable = {k: v for k, v in scorer.unavailable.items() if v}
    if scorer.clip is None and scorer.dino is None:
        return [], unavailable
    rows = []
    for method in METHODS:
        images = generate(pipe, texts, None if method == "base" else residuals, lag=method == "residuals+lag",
                          seed=seed, num_images=images_per_prompt, steps=steps)
        grouped = [images[i:i + images_per_prompt] for i in range(0, len(images), images_per_prompt)]
        for row in scorer.score(subject, concept, grouped, None):
            rows.append({"protocol": "run", "target": method.split("+")[0], "method": method,
                         "subject": subject.name, **row,
                         "parameters": residuals.num_parameters() if method != "base" else 0,
                         "train_seconds": train_seconds if method != "base" else None})
    return rows, unavailable


def scores_table(rows: list[dict], unavailable: dict[str, str]) -> tuple[list[dict], str]:
    """(summary rows per method, the markdown table with 95% intervals and what was unavailable)."""
    summary = summarize(rows) if rows else []
    return summary, format_table(summary, unavailable)
