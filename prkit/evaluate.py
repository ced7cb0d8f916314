"""Evaluation harness: train every method on every subject with its recipe, sample, score, tabulate.

Owns the runner and its command line: every (method, subject) job, split across processes under torchrun /
accelerate launch (ranks claim jobs from one queue and write their own part; rank 0 merges). The protocols'
subjects live in ``eval_subjects``, the scorer in ``eval_scorer``, the jobs and their queue in ``eval_jobs``,
the results CSV and summary in ``eval_results`` (all re-exported here); metrics, training and sampling elsewhere.

    prkit eval --protocol world --methods residuals lora textual_inversion --out runs/eval
    torchrun --nproc_per_node 2 -m prkit.evaluate --protocol dreambooth --data dreambooth/dataset --model DIR
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import json
import logging
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

from .checks import check_whole
from .cli_args import MAX_IMAGES, _guidance, _positive_int, _whole, bars_wanted
from .eval_jobs import (  # noqa: F401
    JobQueue, _device, _group, clear_run_state, dist_env, gather_timings, job_cost, job_list, shard, variants,
    write_timing,
)
from .eval_results import (  # noqa: F401  (re-exported: prkit.evaluate is the harness's one public module)
    BINARY, COLUMNS, KEY, LABELS, METHODS, METRICS, RESULTS, SUMMARY, append_rows, finished_pairs, format_table,
    interval, mean_ci, check_settings, merge, read_rows, summarize, t975, wilson_ci, write_rows, write_settings,
)
from .eval_scorer import Scorer, strip_token  # noqa: F401
from .eval_subjects import PROTOCOLS, Subject, load_customconcept101, load_subjects  # noqa: F401
from .revisions import pipeline_revision

log = logging.getLogger(__name__)

DEFAULT_METHODS = ("residuals", "lora", "custom_diffusion", "textual_inversion", "dreambooth")


@dataclass
class EvalConfig:
    """What an evaluation runs; every training recipe is the method's published one (``targets.RECIPES``)."""

    protocol: str = "world"  # world | dreambooth | customconcept101
    data: str | None = None  # dataset root for dreambooth / customconcept101
    model: str = "world"  # base pipeline: "world", a diffusers folder or a hub id
    methods: tuple[str, ...] = DEFAULT_METHODS  # "residuals" is sampled with and without LAG; "base" trains nothing
    subjects: tuple[str, ...] = ()  # empty: all of the protocol's subjects
    max_prompts: int | None = None  # only the first N prompts of each subject (smoke runs)
    images_per_prompt: int = 4  # seeds 0..N-1 of one generator per prompt
    sample_steps: int = 25
    guidance_scale: float = 7.5
    seed: int = 0  # training and sampling seed
    token: str = "sks"  # identifier for dreambooth / customconcept101 (world concepts bring their own)
    train: dict = field(default_factory=dict)  # method -> recipe overrides, e.g. {"textual_inversion": {"steps": 500}}
    clip: str | None = "auto"  # hub id, folder or "world"; auto: "world" on the world, CLIP ViT-B/32 elsewhere
    dino: str | None = "auto"  # auto: DINO ViT-S/16; None: off
    download_backbones: bool = False  # fetch CLIP/DINO hub ids missing from the local cache (default: no network)
    out: str = "runs/eval"
    device: str = "auto"  # with several ranks, "auto" is cuda:LOCAL_RANK
    dtype: str | None = None  # pipeline dtype (None: bf16/fp16 on GPUs, fp32 elsewhere)
    save_images: bool = False  # PNGs under out/images/<method>/<subject>/
    ci_over: str = "image"  # 95% interval over images or over per-subject means ("subject")

    def __post_init__(self):
        check_whole(self, ("images_per_prompt", "sample_steps"), 1)
        check_whole(self, ("seed",), 0)
        check_whole(self, ("max_prompts",), 1, " (or None: all)")
        if not (isinstance(self.guidance_scale, (int, float)) and 0 <= self.guidance_scale < float("inf")):
            raise ValueError(f"EvalConfig.guidance_scale must be a finite number >= 0, got {self.guidance_scale!r}")
        import torch

        if not isinstance(self.dtype, torch.dtype) and self.dtype not in (None, "fp32", "float32", "fp16", "float16",
                                                                          "bf16", "bfloat16"):
            raise ValueError(f"EvalConfig.dtype must be None, 'fp32', 'fp16' or 'bf16', got {self.dtype!r}")
        if self.ci_over not in ("image", "subject"):  # checked before any job runs, not at the summary
            raise ValueError(f"EvalConfig.ci_over must be 'image' or 'subject', got {self.ci_over!r}")
        for method, overrides in self.train.items():  # before any model loads, not at the method's first job
            if isinstance(overrides, dict) and overrides.get("checkpoint_dir"):
                checkpoint_folder(overrides["checkpoint_dir"], method, "subject")


def checkpoint_folder(folder, method: str, subject: str) -> str:
    """Where an evaluation's run of ``method`` on ``subject`` keeps its checkpoint, given the method's
    ``checkpoint_dir``: ``<folder>/<method>/<subject>``, or where the folder's name holds ``{subject}`` or
    ``{method}``, the name with them filled in. A folder shared by a method's subjects (and maybe by other methods)
    would have every run after the first refuse the first one's checkpoint. Other braces are refused."""
    import string

    text = str(folder)
    try:
        fields = [(name, spec, conv) for _, name, spec, conv in string.Formatter().parse(text) if name is not None]
    except ValueError as err:  # an unmatched brace
        raise ValueError(f"{method}.checkpoint_dir={text!r}: {err}; name the folder with {{subject}} and {{method}} "
                         "only, or without braces") from err
    bad = ["{" + name + (f"!{conv}" if conv else "") + (f":{spec}" if spec else "") + "}"
           for name, spec, conv in fields if name not in ("subject", "method") or spec or conv]
    if bad:
        raise ValueError(f"{method}.checkpoint_dir={text!r} names {', '.join(bad)}; only {{subject}} and {{method}} "
                         "are filled in (or no braces: <folder>/<method>/<subject>)")
    if "{subject}" in text or "{method}" in text:
        return str(Path(text.format(subject=subject, method=method)).expanduser())
    return str(Path(text).expanduser() / method / subject)


# ------------------------------------------------------------------------------------------------ running

def _train_config(method: str, subject: Subject, config: EvalConfig, resolution: int,
                  model_defaults: dict | None = None):
    """The method's published recipe; the model folder's own learning rate for it (prkit_defaults.json, used as
    given, as ``train_residuals`` does) replaces the recipe's; the run's ``--set`` overrides go on top. A
    ``checkpoint_dir`` becomes ``<checkpoint_dir>/<method>/<subject>``, or where it holds "{subject}" (and
    "{method}"), is formatted with them."""
    from .data import load_concept
    from .targets import recipe
    from .train import TrainConfig

    overrides = dict(config.train.get(method, {}))
    prior = overrides.get("prior_images")
    if isinstance(prior, str):  # a folder of class images; "{subject}" is replaced by the subject's name
        overrides["prior_images"] = load_concept(prior.format(subject=subject.name), subject.token,
                                                 subject.class_word, resolution)
    if overrides.get("checkpoint_dir"):
        overrides["checkpoint_dir"] = checkpoint_folder(overrides["checkpoint_dir"], method, subject.name)
    fields = recipe(method, **overrides)
    if "learning_rate" not in overrides and (model_defaults or {}).get("learning_rate") is not None:
        fields["learning_rate"] = float(model_defaults["learning_rate"])
    return TrainConfig(**{"seed": config.seed, **fields})


def run_job(pipe, subject: Subject, method: str, config: EvalConfig, scorer: Scorer,
            base_images: dict | None = None) -> list[dict]:
    """Train ``method`` on ``subject`` (none for "base"), sample every variant, score; the model is restored after.

    Args:
        base_images: a per-process cache subject -> base-model images (the world's background reference;
            unused by the other protocols).
    Returns:
        one row per (variant, prompt, seed), every column of ``COLUMNS``.
    """
    from .pipeline import model_defaults
    from .residuals import Residuals
    from .sample import generate
    from .train import train_residuals

    resolution = pipe.unet.config.sample_size * pipe.vae_scale_factor
    concept = subject.load(resolution)
    sample = dict(seed=config.seed, num_images=config.images_per_prompt, steps=config.sample_steps,
                  guidance_scale=config.guidance_scale)

    def images_of(handle, lag: bool) -> list[list]:
        residuals = handle if isinstance(handle, Residuals) else None
        return [generate(pipe, p, residuals, lag=lag and residuals is not None, **sample) for p in subject.prompts]

    base = None
    if config.protocol == "world" or method == "base":  # the world compares every method's images with these
        cache = base_images if base_images is not None and config.protocol == "world" else {}
        if subject.name not in cache:
            cache[subject.name] = images_of(None, False)
        base = cache[subject.name]
    handle, seconds, steps = None, 0.0, 0
    rows = []
    try:
        if method != "base":
            result = train_residuals(pipe, concept, _train_config(method, subject, config, resolution,
                                                                   model_defaults(pipe, method)), name="trained",
                                     progress=False)
            handle, seconds, steps = result.residuals, result.seconds, result.steps_done
            if hasattr(handle, "after_training"):
                handle.after_training()
        params = handle.num_parameters() if handle is not None else 0
        for label, lag in variants(method):
            images = base if method == "base" else images_of(handle, lag)
            if config.save_images:
                folder = Path(config.out) / "images" / label / subject.name
                folder.mkdir(parents=True, exist_ok=True)
                for i, group in enumerate(images):
                    for j, im in enumerate(group):
                        im.save(folder / f"{i:02d}_{j}.png")
            for row in scorer.score(subject, concept, images, base if config.protocol == "world" else None):
                rows.append({"protocol": config.protocol, "target": method, "method": label, "subject": subject.name,
                             **row, "parameters": params, "train_seconds": seconds, "train_steps": steps})
    finally:
        if handle is not None:
            handle.remove()
    return rows


def evaluate(config: EvalConfig, pipe=None, *, oracle=None, progress: bool = True) -> list[dict]:
    """Run this process's share of the evaluation; the only or rank-0 process then merges and summarizes.

    A rerun into the same ``out`` skips the finished (method, subject) pairs; it may add methods and subjects, but
    other settings than the rows there were made with (settings.json), the metric backbones that scored them
    included, are refused (``check_settings``).

    Args:
        config: what to run; its ``out`` folder collects results.csv, summary.csv, summary.md and run.json.
        pipe: a loaded pipeline (default: ``load_pipeline(config.model)`` on this rank's device).
        oracle: the world's oracle (default: the shipped one, for the world protocol).
    Returns:
        the summary rows (one per method label) on rank 0, [] on the other ranks.
    """
    from tqdm.auto import tqdm

    start = time.perf_counter()
    rank, world_size, local_rank = dist_env()
    out = Path(config.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"out {str(out)!r} is a file; the evaluation writes a folder there: choose another path")
    out.mkdir(parents=True, exist_ok=True)
    subjects = {s.name: s for s in load_subjects(config)}
    jobs = job_list(config.methods, list(subjects))
    dist = _group(world_size)
    if rank == 0:
        clear_run_state(out)  # claims and timings of an interrupted run (its finished pairs are in the results)
    done = finished_pairs(out)
    import torch

    from .pipeline import resolve_dtype

    device = torch.device(_device(config, local_rank, world_size))
    ran_in = str(resolve_dtype(config.dtype, device)).split(".")[-1]
    todo = [j for j in jobs if j not in done]
    t0 = time.perf_counter()  # the metric backbones first: which of them score is part of the settings
    scorer = Scorer(config, pipe.unet.device if pipe is not None else device, oracle, need_oracle=bool(todo))
    scorer_seconds = time.perf_counter() - t0
    # every rank refuses a rerun with other settings; the backbones only where rows will be scored (a finished folder
    # summarized again keeps the backbones its rows were scored with, whatever loads here now)
    settings = check_settings(out, config, done, ran_in, same_backbones(dist, scorer.backbones) if todo else None)
    if dist is not None:
        dist.barrier()  # every rank has read the finished pairs and settings, and the claims are clear
    if rank == 0:
        write_settings(out, settings)
    cost = lambda j: job_cost(j[0], config, len(subjects[j[1]].prompts))  # noqa: E731
    # one rank: every job in list order; several: each rank takes the next unclaimed job when it is free
    mine = JobQueue(out / "claims", todo, cost, rank) if world_size > 1 else todo
    part = out / RESULTS if world_size == 1 else out / "parts" / f"rank{rank:03d}-of-{world_size:03d}.csv"
    log.info("rank %d/%d: %d of %d jobs to run (%d done before)", rank, world_size, len(todo), len(jobs),
             len(done & set(jobs)))
    timing = {"rank": rank, "load_seconds": scorer_seconds, "jobs": []}
    base_images: dict = {}
    # the bar counts the whole queue: with several ranks, jobs the other ranks took move it too
    bar = tqdm(total=len(todo), desc=f"eval rank {rank}", unit="job", disable=not progress)
    for method, name in mine:
        if pipe is None:  # first job of this rank: load the pipeline every job needs
            from .pipeline import load_pipeline

            t0 = time.perf_counter()
            pipe = load_pipeline(config.model, device=device, dtype=config.dtype)
            pipe.set_progress_bar_config(disable=True)
            timing["load_seconds"] += time.perf_counter() - t0
        if "model_revision" not in timing:  # which revision of the base model this rank's jobs ran on (None: unknown)
            timing["model_revision"] = pipeline_revision(pipe)
        t0 = time.perf_counter()
        try:
            rows = run_job(pipe, subjects[name], method, config, scorer, base_images)
        except Exception as err:  # the command line's error line names the job; its type and words stay as raised
            with contextlib.suppress(AttributeError):
                err.prkit_job = f"{method} on {name!r}"
            raise
        append_rows(part, rows)  # the pair is finished once its rows are in
        timing["jobs"].append({"method": method, "subject": name, "seconds": time.perf_counter() - t0})
        log.info("%s on %s: %d rows", method, name, len(rows))
        _free(pipe)
        bar.update(getattr(mine, "taken", bar.n + 1) - bar.n)  # jobs claimed so far, this one finished
    bar.update(len(todo) - bar.n)
    bar.close()
    timing["loop_seconds"] = time.perf_counter() - start
    if dist is not None:
        write_timing(out, timing)
        dist.barrier()  # every part is written
    if rank != 0:
        return []
    ranks = gather_timings(out, world_size) if dist is not None else [timing]
    # which revisions made and scored the rows (prkit.revisions); a rerun that ran no job keeps the record of the
    # run that made them
    ran = [r["model_revision"] for r in ranks if "model_revision" in r]
    recorded = _recorded_revisions(out) if done else {}
    if ran:
        revisions = {"model": next(filter(None, ran), None), **scorer.revisions}
        if recorded.get("model") and revisions["model"] and recorded["model"] != revisions["model"]:
            log.warning("the rows in %s were made by other revisions of the model: %s before, %s now; run.json "
                        "records the newer", out, recorded["model"], revisions["model"])
    else:  # nothing ran: what made and scored the rows stays recorded
        revisions = {"model": recorded.get("model"), **{k: recorded.get(k) for k in scorer.revisions}}
    rows = merge(out)
    missing = sorted(set(jobs) - finished_pairs(out))
    if missing:  # e.g. claims left behind that no rank could clear, or an out folder the ranks do not share
        log.warning("%d job(s) have no rows: %s; run the same command again to finish them", len(missing),
                    ", ".join(f"{m} on {s}" for m, s in missing))
    unavailable = scorer.unavailable
    summary = summarize(rows, config.ci_over)
    write_rows(out / SUMMARY, summary, columns=list(summary[0]) if summary else ["method"])
    _write_text(out / "summary.md", format_table(summary, unavailable, config.ci_over))
    run = {"config": asdict(config), "world_size": world_size, "seconds": time.perf_counter() - start,
           "unavailable": unavailable, "jobs": len(jobs), "ranks": ranks,
           "missing_jobs": [list(j) for j in missing],
           # the model folder's own defaults (prkit_defaults.json) this process trained with, when it trained
           "model_defaults": getattr(pipe, "prkit_defaults", None) if pipe is not None else None,
           "revisions": revisions}
    _write_text(out / "run.json", json.dumps(run, indent=2, default=str) + "\n")
    return summary


def _recorded_revisions(out: Path) -> dict:
    """The revisions (model, clip, dino) that ``out``'s run.json records; {} where there is none or no readable
    run.json."""
    try:
        recorded = json.loads((out / "run.json").read_text(encoding="utf-8"))["revisions"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    return {k: v for k, v in recorded.items() if isinstance(v, dict)} if isinstance(recorded, dict) else {}


def same_backbones(dist, backbones: dict) -> dict:
    """``backbones`` (``Scorer.backbones``) when every rank loaded the same, else refused: ranks on machines with
    other caches or folders would write rows scored with and without a metric into one table."""
    if dist is None:
        return backbones
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, backbones)
    other = [(r, b) for r, b in enumerate(every) if b != every[0]]
    if other:
        r, b = other[0]
        raise ValueError(f"the ranks loaded other metric backbones: rank 0 {every[0]}, rank {r} {b} (None: not "
                         "loadable there, see its warning); make the same --clip / --dino folders or cached hub ids "
                         "reachable from every rank, or switch the metric off on all with 'none'")
    return backbones


def _write_text(path: Path, text: str) -> None:
    """``text`` as UTF-8 into ``path``, whole or not at all (an interrupt leaves the old file)."""
    from .atomic import atomic_path

    with atomic_path(path) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")


def _free(pipe) -> None:
    import gc

    import torch

    gc.collect()
    if pipe.unet.device.type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------------- CLI

def _parse_set(items: Sequence[str]) -> dict:
    """["textual_inversion.steps=500", ...] -> {"textual_inversion": {"steps": 500}}."""
    out: dict = {}
    for item in items:
        key, sep, value = item.partition("=")
        method, dot, field_name = key.partition(".")
        if not sep or not dot:
            raise ValueError(f"--set wants METHOD.FIELD=VALUE (e.g. textual_inversion.steps=500), got {item!r}")
        if method not in METHODS:
            raise ValueError(f"--set {item!r}: {method!r} is not a method; one of {', '.join(METHODS)}")
        fields = _recipe_fields()
        if field_name not in fields:
            raise ValueError(f"--set {item!r}: {field_name!r} is not a recipe field; one of {', '.join(fields)}")
        try:
            parsed = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            parsed = value
        out.setdefault(method, {})[field_name] = parsed
    return out


def _recipe_fields() -> list[str]:
    """What ``--set METHOD.FIELD=`` may name: TrainConfig's fields and the recipes' own keys (scale_lr)."""
    from dataclasses import fields

    from .train_config import TrainConfig

    return sorted({f.name for f in fields(TrainConfig)} | {"scale_lr"})


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The evaluation options (shared by ``prkit eval`` and ``python -m prkit.evaluate``)."""
    d = EvalConfig()
    parser.add_argument("--protocol", choices=PROTOCOLS, default=d.protocol)
    parser.add_argument("--data", default=None, help="dataset folder (dreambooth, customconcept101)")
    parser.add_argument("--model", default=d.model, help="'world', a diffusers folder or a hub id")
    parser.add_argument("--methods", nargs="+", default=list(d.methods), choices=METHODS)
    parser.add_argument("--subjects", nargs="*", default=[], help="default: all of the protocol's")
    parser.add_argument("--max-prompts", type=_positive_int, default=None,
                        help="only each subject's first N prompts (smoke runs); default: all")
    parser.add_argument("--images-per-prompt", type=_whole(1, MAX_IMAGES), default=d.images_per_prompt,
                        help=f"seeds 0..N-1 per prompt, made in one batch: 1 to {MAX_IMAGES} "
                             f"(default {d.images_per_prompt})")
    parser.add_argument("--sample-steps", type=_positive_int, default=d.sample_steps,
                        help=f"denoising steps (default {d.sample_steps})")
    parser.add_argument("--guidance-scale", type=_guidance, default=d.guidance_scale,
                        help=f"classifier-free guidance (default {d.guidance_scale})")
    parser.add_argument("--seed", type=_whole(0), default=d.seed, help="training and sampling seed (default 0)")
    parser.add_argument("--token", default=d.token)
    parser.add_argument("--set", dest="train", nargs="*", default=[], metavar="METHOD.FIELD=VALUE",
                        help="recipe overrides, e.g. textual_inversion.steps=500 "
                             "dreambooth.prior_images=class_images/{subject}; a METHOD.checkpoint_dir=DIR keeps "
                             "each run's checkpoint in DIR/METHOD/SUBJECT")
    parser.add_argument("--clip", default=d.clip, help="hub id, folder, 'world', 'auto' or 'none'")
    parser.add_argument("--dino", default=d.dino, help="hub id, folder, 'auto' or 'none'")
    parser.add_argument("--download-backbones", action="store_true",
                        help="fetch CLIP/DINO hub ids missing from the local cache")
    parser.add_argument("--out", default=d.out)
    parser.add_argument("--device", default=d.device)
    parser.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default=None,
                        help="pipeline dtype (default: bf16/fp16 on GPUs, fp32 elsewhere)")
    parser.add_argument("--save-images", action="store_true")
    parser.add_argument("--ci-over", choices=("image", "subject"), default=d.ci_over)
    return parser


def config_from_args(args) -> EvalConfig:
    none = lambda v: None if v in (None, "none", "None", "") else v  # noqa: E731
    return EvalConfig(protocol=args.protocol, data=args.data, model=args.model, methods=tuple(args.methods),
                      subjects=tuple(args.subjects), max_prompts=args.max_prompts,
                      images_per_prompt=args.images_per_prompt, sample_steps=args.sample_steps,
                      guidance_scale=args.guidance_scale, seed=args.seed, token=args.token,
                      train=_parse_set(args.train), clip=none(args.clip), dino=none(args.dino), out=args.out,
                      device=args.device, dtype=args.dtype, save_images=args.save_images, ci_over=args.ci_over,
                      download_backbones=args.download_backbones)


def run_from_args(args) -> int:
    """Run an evaluation from parsed arguments; rank 0 prints the summary table."""
    config = config_from_args(args)
    summary = evaluate(config, progress=bars_wanted())
    if dist_env()[0] == 0:
        print((Path(config.out) / "summary.md").read_text(encoding="utf-8") if summary else "no results")
        print(f"wrote {Path(config.out) / RESULTS} and {Path(config.out) / SUMMARY}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m prkit.evaluate", description=__doc__.splitlines()[0])
    add_arguments(parser)
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    from .cli import _error_line, _expand_paths

    _expand_paths(args)  # "~" in --out/--data, as `prkit eval` does
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return run_from_args(args)
    except (OSError, ValueError, RuntimeError, TypeError) as err:  # a message, as `prkit eval` says it, no traceback
        print(f"{parser.prog}: error: {_error_line(err, 'eval')}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
