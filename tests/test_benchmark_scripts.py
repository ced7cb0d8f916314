"""The benchmark scripts still run against the library they patch and measure (tiny models, CPU, in a process of
their own: they patch prkit's modules)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("variant", ["now", "textbg"])
def test_the_first_recipe_timeline_runs_and_records_each_phase(tmp_path, variant):
    env = dict(os.environ, HF_HUB_OFFLINE="1", CUDA_VISIBLE_DEVICES="")
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "first_recipe_timeline.py"), "--tiny", "--out",
                    str(tmp_path), "--variant", variant, "--tag", "t"], check=True, env=env, cwd=ROOT,
                   capture_output=True, timeout=300)
    data = json.loads((tmp_path / f"timeline_{variant}_t.json").read_text())
    assert [r["loss_first"] for r in data["results"].values()] == [data["results"]["first"]["loss_first"]] * 2
    names = [name for _, _, name in data["events"]]
    for phase in ("train_fast>", "cache>", "latents>", "latents<", "prompt>", "prompt<", "first_call<",
                  "unet_forward>", "recipe_later<"):
        assert phase in names
    assert names.index("prompt>") < names.index("first_call>")


def test_the_cross_attention_bench_runs_and_checks_each_variant_against_fp64(tmp_path):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "cross_attention.py"), "--tiny", "--out",
                    str(tmp_path / "x.json")], check=True, env=env, cwd=ROOT, capture_output=True, timeout=120)
    data = json.loads((tmp_path / "x.json").read_text())
    rows = list(data["shapes"].values())
    assert len(rows) == 2 and all(set(row) == {"math", "per_head", "shared_heads", "shared_heads_fused_scale"}
                                  for row in rows)
    for row in rows:
        for result in row.values():
            assert result["err_out"] < 1e-5 and result["err_dq"] < 1e-5 and result["ms"] > 0
    assert set(data["ms_per_step"]) == set(rows[0])
