"""Evaluation harness: train every method on every subject with its recipe, sample, score, tabulate.

Owns the runner and its command line: every (method, subject) job, split across processes under torchrun /
accelerate launch (ranks claim jobs from one queue and write their own part; rank 0 merges). The protocols'
subjects live in ``eval_subjects``, the scorer in ``eval_scorer``, the jobs and their queue in ``eval_jobs``,
the results CSV and summary in ``eval_results``, the configuration in ``eval_config``, the command line in
``eval_cli`` (all re-exported here); metrics, training and sampling elsewhere.

    prkit eval --protocol world --methods residuals lora textual_inversion --out runs/eval
    torchrun --nproc_per_node 2 -m prkit.evaluate --protocol dreambooth --data dreambooth/dataset --model DIR
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import time
from dataclasses import asdict
from pathlib import Path

from .eval_cli import _parse_set, _recipe_fields, add_arguments, config_from_args, main, run_from_args  # noqa: F401
from .eval_config import DEFAULT_METHODS, EvalConfig, checkpoint_folder, prior_folder  # noqa: F401
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
    prior = prior_folder(overrides.get("prior_images"))
    if prior is not None:  # a folder of class images; "{subject}" is replaced by the subject's name
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
            handle, seconds, steps = result.residuals, result.seconds, result.steps_done  # (DreamBooth cast back there)
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
    # the dtype the rows are made in: a given pipeline's own, else the one load_pipeline will give it
    ran_in = str(pipe.unet.dtype if pipe is not None else resolve_dtype(config.dtype, device)).split(".")[-1]
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


if __name__ == "__main__":
    sys.exit(main())
