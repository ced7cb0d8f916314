"""The evaluation's jobs and who runs them: the (method, subject) list, a cost model, static shards, the shared
claim queue that hands each rank the next job as it frees up, and the launcher's environment (torchrun,
accelerate launch) with the gloo group of the runner's two barriers.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

from .eval_results import METHODS

if TYPE_CHECKING:
    from .evaluate import EvalConfig


def variants(method: str) -> list[tuple[str, bool]]:
    """The sampled variants of a trained method: (row label, LAG on)."""
    return [("residuals", False), ("residuals+lag", True)] if method == "residuals" else [(method, False)]


def job_list(methods: Sequence[str], subjects: Sequence[str]) -> list[tuple[str, str]]:
    """Every (method, subject) pair, method-major; a method or subject named twice runs once."""
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"unknown method {m!r}; known: {', '.join(METHODS)}")
    return [(m, s) for m in dict.fromkeys(methods) for s in dict.fromkeys(subjects)]


def job_cost(method: str, config: EvalConfig, prompts: int) -> float:
    """A rough relative cost of one job (training image-steps plus sampling), for balancing shards."""
    from .targets import recipe

    sampling = prompts * config.images_per_prompt * config.sample_steps * len(variants(method)) * 2  # CFG: x2
    if method == "base":
        return float(sampling)
    r = recipe(method, **config.train.get(method, {}))
    weight = {"dreambooth": 3.0, "custom_diffusion": 1.3}.get(method, 1.0)  # full backward + optimizer state
    return r["steps"] * r["batch_size"] * 3 * weight + sampling  # a training step ~ 3 forward passes


def shard(jobs: Sequence, rank: int, world_size: int, cost: Callable | None = None) -> list:
    """This rank's share of ``jobs``, the same on every rank (deterministic).

    Args:
        jobs: the full job list, in the same order on every rank.
        rank, world_size: this process and how many there are.
        cost: job -> relative cost; given, jobs go longest first to the least loaded rank (LPT), else round-robin.
    Returns:
        the rank's jobs, in the list's order.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, {world_size})")
    if cost is None:
        return list(jobs[rank::world_size])
    load = [0.0] * world_size
    owner = {}
    for i in sorted(range(len(jobs)), key=lambda i: (-cost(jobs[i]), i)):
        r = min(range(world_size), key=lambda k: (load[k], k))
        owner[i] = r
        load[r] += cost(jobs[i])
    return [job for i, job in enumerate(jobs) if owner[i] == rank]


class JobQueue:
    """Jobs handed to whichever rank asks first, through claim files in a folder every rank sees.

    Every rank walks the same list, costliest first, and takes a job by creating its claim file exclusively
    (``O_CREAT | O_EXCL``: exactly one rank wins). A rank that runs slower (another card, a longer first job,
    a cost model that is off) just takes fewer jobs, so no rank waits at the final barrier while work is still
    queued, which a static shard cannot promise. Claims say only who is running what: ``reset`` clears them at
    the start of a run, so an interrupted run resumes from its written results.

    Args:
        folder: the claims folder (on a file system all ranks share, like the results' part files).
        jobs: the job list, the same on every rank.
        cost: job -> relative cost (costliest first, the online form of the LPT shard); None keeps list order.
        rank: this rank, written into its claims.
    """

    def __init__(self, folder: str | Path, jobs: Sequence, cost: Callable | None = None, rank: int = 0):
        self.folder = Path(folder)
        self.rank = rank
        order = sorted(range(len(jobs)), key=lambda i: (-cost(jobs[i]), i)) if cost else range(len(jobs))
        self.jobs = [jobs[i] for i in order]

    @staticmethod
    def reset(folder: str | Path) -> None:
        """Remove every claim (call on one rank, before the barrier that precedes the first claim)."""
        try:
            shutil.rmtree(folder)
        except FileNotFoundError:
            pass

    def _path(self, job) -> Path:
        return self.folder / (hashlib.sha1(repr(job).encode()).hexdigest()[:20] + ".claim")

    def claim(self, job) -> bool:
        """Take ``job`` for this rank; False when another rank has it already."""
        self.folder.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self._path(job), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps({"job": list(job), "rank": self.rank, "time": time.time()}) + "\n")
        return True

    def __len__(self) -> int:
        return len(self.jobs)

    def __iter__(self) -> Iterator:
        """The jobs this rank wins, one claim at a time (claim the next only when asked for it).
        ``taken`` counts the queue's jobs claimed so far by any rank, as this rank has seen them."""
        self.taken = 0
        for job in self.jobs:
            self.taken += 1
            if self.claim(job):
                yield job


def _timing_path(out: Path, rank: int) -> Path:
    return Path(out) / "parts" / f"rank{rank:03d}-timing.json"


def clear_run_state(out: str | Path) -> None:
    """Remove what an interrupted run left beside its results: job claims and rank timings (rank 0, at start)."""
    JobQueue.reset(Path(out) / "claims")
    for stale in (Path(out) / "parts").glob("rank*-timing.json"):
        stale.unlink()


def write_timing(out: str | Path, timing: dict) -> None:
    """This rank's timings, for rank 0 to gather after the final barrier."""
    path = _timing_path(out, timing["rank"])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(timing) + "\n")


def gather_timings(out: str | Path, world_size: int) -> list[dict]:
    """Every rank's timings of this run (rank 0, after the final barrier); removes them and the claims."""
    paths = [_timing_path(out, r) for r in range(world_size)]
    ranks = [json.loads(p.read_text()) for p in paths if p.is_file()]
    for p in paths:
        p.unlink(missing_ok=True)
    JobQueue.reset(Path(out) / "claims")
    return ranks


def dist_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) from the launcher's environment (torchrun, accelerate); (0, 1, 0) alone."""
    env = os.environ
    return int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0))


def _device(config: EvalConfig, local_rank: int, world_size: int):
    import torch

    from .pipeline import resolve_device

    if config.device == "auto" and world_size > 1 and torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return resolve_device(config.device)


def _group(world_size: int):
    """A gloo process group for the two barriers (CPU-only: works on any launcher and device); None alone."""
    if world_size == 1:
        return None
    import datetime

    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo", timeout=datetime.timedelta(hours=72))
    return dist

