"""The evaluation harness split over two processes by torchrun on the CPU (gloo): same rows as one process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

import prkit.evaluate as ev
from test_evaluate import _config, assets  # noqa: F401 - the shared dataset/backbone fixture
from conftest import child_env
from tiny import tiny_pipeline


def test_two_processes_under_torchrun_match_one(assets, tmp_path):
    """torchrun --nproc_per_node 2 on the CPU (gloo): ranks claim jobs from one queue, rank 0 merges; rows as one process."""
    model = tmp_path / "model"
    tiny_pipeline(tmp_path / "build").save_pretrained(model)
    single = tmp_path / "single"
    ev.evaluate(_config(assets, single, dino=None), tiny_pipeline(tmp_path / "pipe"), progress=False)
    out = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "prkit.evaluate", "--protocol", "dreambooth", "--data", str(assets["data"]), "--model", str(model),
           "--subjects", "dog", "--methods", "residuals", "textual_inversion",
           "--set", "residuals.steps=3", "textual_inversion.steps=3",
           "--images-per-prompt", "2", "--sample-steps", "2", "--clip", str(assets["clip"]), "--dino", "none",
           "--device", "cpu", "--out", str(out)]
    env = child_env(OMP_NUM_THREADS="1")  # this checkout first, the caller's path kept
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both ranks
        raise
    assert proc.returncode == 0, stderr[-3000:]
    assert "wrote" in stdout and not list((out / "parts").iterdir())
    run = json.loads((out / "run.json").read_text())
    assert run["world_size"] == 2 and not (out / "claims").exists()
    ranks = {r["rank"]: [(j["method"], j["subject"]) for j in r["jobs"]] for r in run["ranks"]}
    assert sorted(ranks) == [0, 1]  # both ranks report; each job ran on exactly one of them
    assert sorted(ranks[0] + ranks[1]) == [("residuals", "dog"), ("textual_inversion", "dog")]
    from prkit.revisions import model_revision

    assert run["revisions"]["model"] == model_revision(model) and run["revisions"]["dino"] is None  # from the ranks
    two, one = ev.read_rows(out / ev.RESULTS), ev.read_rows(single / ev.RESULTS)
    assert [[r[k] for k in ev.KEY] for r in two] == [[r[k] for k in ev.KEY] for r in one]
    for a, b in zip(two, one):
        assert float(a["clip_i"]) == pytest.approx(float(b["clip_i"]), abs=1e-4)
