"""The evaluation's results table: its columns, atomic CSV rows, the per-rank part files and their merge, and the
summary (mean and 95% interval per method label). No training, sampling or scoring here.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Sequence

METHODS = ("base", "residuals", "lora", "custom_diffusion", "textual_inversion", "dreambooth", "attn_kv", "attn_out")
METRICS = ("identity", "identity_colors", "scene", "class", "background_change",  # the world's oracle
           "clip_i", "clip_t_dreambooth", "clip_t_clipscore", "dino")
BINARY = ("identity", "identity_colors", "scene", "class")  # 0 or 1 per image: their means are proportions
COLUMNS = ["protocol", "target", "method", "subject", "prompt_index", "prompt", "seed", *METRICS,
           "parameters", "train_seconds", "train_steps"]
KEY = ("target", "method", "subject", "prompt_index", "seed")  # one row per key
LABELS = {"identity": "identity", "identity_colors": "identity + colours", "scene": "prompt (scene)", "class": "class",
          "background_change": "bg change", "clip_i": "CLIP-I", "clip_t_dreambooth": "CLIP-T raw cos (DreamBooth)",
          "clip_t_clipscore": "CLIP-T 2.5*max(cos,0) (CLIPScore)", "dino": "DINO"}
RESULTS, SUMMARY = "results.csv", "summary.csv"


def read_rows(path: Path) -> list[dict]:
    """Rows of a results CSV (strings), [] when it does not exist."""
    if not Path(path).is_file():
        return []
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _cell(value) -> str:
    value = value.item() if hasattr(value, "item") else value  # numpy / torch scalars
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, bool):
        return str(int(value))
    return repr(float(value)) if isinstance(value, float) else str(value)


def write_rows(path: Path, rows: list[dict], columns: Sequence[str] = COLUMNS) -> Path:
    """Write rows atomically (``atomic.atomic_path``: temporary file, fsync, rename, a new file's usual mode):
    readers see the old or the new file, never half."""
    from .atomic import atomic_path

    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        writer.writerows({k: _cell(v) for k, v in r.items()} for r in rows)
    return path


def append_rows(path: Path, rows: list[dict]) -> Path:
    """Add one finished pair's rows to ``path`` as one atomic replacement of the file."""
    return write_rows(path, read_rows(path) + rows)


def _part_files(out: Path) -> list[Path]:
    return sorted((out / "parts").glob("*.csv")) if (out / "parts").is_dir() else []


def finished_pairs(out: str | Path) -> set[tuple[str, str]]:
    """(method, subject) pairs with rows in ``out``'s results CSV or in any rank's part file."""
    out = Path(out)
    return {(r["target"], r["subject"]) for p in [out / RESULTS, *_part_files(out)] for r in read_rows(p)}


def merge(out: str | Path) -> list[dict]:
    """Fold every part file into results.csv (one row per key, sorted), then delete the parts; returns the rows."""
    out = Path(out)
    parts = _part_files(out)
    rows: dict[tuple, dict] = {}
    for path in [out / RESULTS, *parts]:
        for r in read_rows(path):
            rows[tuple(r[k] for k in KEY)] = r
    order = {m: i for i, m in enumerate(METHODS)}
    merged = sorted(rows.values(), key=lambda r: (order.get(r["target"], 99), r["method"], r["subject"],
                                                  int(r["prompt_index"]), int(r["seed"])))
    write_rows(out / RESULTS, merged)
    for path in parts:
        path.unlink()
    return merged


Z975 = 1.959963984540054  # two-sided 95% normal quantile


def _t_within(t: float, df: int) -> float:
    """P(|T| < t) of Student's t with a whole ``df`` >= 1: the finite sums of Abramowitz & Stegun 26.7.3-4."""
    theta = math.atan(t / math.sqrt(df))
    c2, total, term, even = math.cos(theta) ** 2, 1.0, 1.0, df % 2 == 0
    for k in range(1, df // 2 if even else (df - 1) // 2):
        term *= c2 * ((2 * k - 1) / (2 * k) if even else 2 * k / (2 * k + 1))
        total += term
    if even:
        return math.sin(theta) * total
    return 2 / math.pi * (theta + (math.sin(theta) * math.cos(theta) * total if df > 1 else 0.0))


def t975(df: int) -> float:
    """Two-sided 95% Student-t quantile for ``df`` degrees of freedom (NaN below 1), to about 1e-6: under 30 by
    bisection on the exact distribution function, from 30 on by the Cornish-Fisher expansion (A&S 26.7.5), whose
    error there is below 1e-6."""
    if df < 1:
        return float("nan")
    if df >= 30:
        z = Z975
        g = [(z ** 3 + z) / 4, (5 * z ** 5 + 16 * z ** 3 + 3 * z) / 96,
             (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / 384,
             (79 * z ** 9 + 776 * z ** 7 + 1482 * z ** 5 - 1920 * z ** 3 - 945 * z) / 92160]
        return z + sum(gk / df ** (k + 1) for k, gk in enumerate(g))
    low, high = 0.0, 100.0
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (mid, high) if _t_within(mid, df) < 0.95 else (low, mid)
    return (low + high) / 2


def mean_ci(values: Sequence[float]) -> tuple[float, float]:
    """(mean, half-width of the 95% t-interval) of the finite values; NaN where undefined."""
    xs = [float(v) for v in values if v == v and not math.isinf(float(v))]
    if not xs:
        return float("nan"), float("nan")
    mean = sum(xs) / len(xs)
    if len(xs) < 2:
        return mean, float("nan")
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1))
    return mean, t975(len(xs) - 1) * sd / math.sqrt(len(xs))


def wilson_ci(values: Sequence[float]) -> tuple[float, float, float]:
    """(proportion, low, high): the 95% Wilson score interval of the finite 0/1 values, inside [0, 1] (the
    t-interval of 0/1 values runs past 1 near 100%, and past 0 near 0%); NaN where there are none."""
    xs = [float(v) for v in values if v == v and not math.isinf(float(v))]
    if not xs:
        return float("nan"), float("nan"), float("nan")
    odd = sorted({x for x in xs if x not in (0.0, 1.0)})
    if odd:
        raise ValueError(f"a proportion's values must be 0 or 1, got {odd[:3]}: these rows do not hold a 0/1 "
                         "metric; summarize other values with mean_ci")
    n, p, z2 = len(xs), sum(xs) / len(xs), Z975 ** 2
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = Z975 / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return p, 0.0 if p == 0 else max(0.0, centre - half), 1.0 if p == 1 else min(1.0, centre + half)


def interval(metric: str, values: Sequence[float], ci_over: str = "image") -> tuple[float, float, float, float]:
    """(mean, t half-width, low, high) of the 95% interval of ``metric`` over ``values``. Continuous metrics: the
    t-interval, mean ± half-width. Proportions (``BINARY``): over images (0/1 each), the Wilson score interval; over
    per-subject proportions, the t-interval clipped to [0, 1]; either is uneven about the mean, so their half-width
    is NaN and ``low``/``high`` say it."""
    if metric in BINARY and ci_over == "image":
        mean, low, high = wilson_ci(values)
        return mean, float("nan"), low, high
    mean, half = mean_ci(values)
    low, high = mean - half, mean + half
    if metric in BINARY:  # NaN ends stay NaN (max(0.0, nan) is 0.0: no interval read [0, 1])
        return mean, float("nan"), low if low != low else max(0.0, low), high if high != high else min(1.0, high)
    return mean, half, low, high


def _num(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def summarize(rows: list[dict], ci_over: str = "image") -> list[dict]:
    """Per method: images, subjects, mean trainable parameters and training seconds, and mean and 95%
    interval of every metric (over images, or over per-subject means with ``ci_over="subject"``): ``<metric>_ci95``
    the t-interval's half-width (NaN for proportions, whose interval is uneven), ``<metric>_ci95_low`` and
    ``_high`` its ends (``interval``)."""
    if ci_over not in ("image", "subject"):
        raise ValueError(f"ci_over must be 'image' or 'subject', got {ci_over!r}")
    order = {m: i for i, m in enumerate(METHODS)}
    methods = sorted({r["method"] for r in rows}, key=lambda m: (order.get(m.split("+")[0], 99), m))
    out = []
    for method in methods:
        sel = [r for r in rows if r["method"] == method]
        subjects = sorted({r["subject"] for r in sel})
        per_subject = [next(r for r in sel if r["subject"] == s) for s in subjects]
        summary = {"method": method, "images": len(sel), "subjects": len(subjects),
                   "parameters": mean_ci([_num(r["parameters"]) for r in per_subject])[0],
                   "train_seconds": mean_ci([_num(r["train_seconds"]) for r in per_subject])[0]}
        for m in METRICS:
            if ci_over == "image":
                values = [_num(r.get(m)) for r in sel]
            else:
                values = [mean_ci([_num(r.get(m)) for r in sel if r["subject"] == s])[0] for s in subjects]
            summary[m], summary[f"{m}_ci95"], summary[f"{m}_ci95_low"], summary[f"{m}_ci95_high"] = \
                interval(m, values, ci_over)
        out.append(summary)
    return out


def format_table(summary: list[dict], unavailable: dict[str, str] | None = None, ci_over: str = "image") -> str:
    """A markdown table of the summary (metrics with no value in any row are left out), reasons as notes."""
    shown = [m for m in METRICS if any(s[m] == s[m] for s in summary)]
    head = ["method", "subjects", "images", *[LABELS[m] for m in shown], "trainable params", "train s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in summary:
        cells = [s["method"], str(s["subjects"]), str(s["images"])]
        for m in shown:
            ci, low, high = s[f"{m}_ci95"], s[f"{m}_ci95_low"], s[f"{m}_ci95_high"]
            if m in BINARY:
                cells.append(f"{s[m]:.4f}" + (f" [{low:.4f}, {high:.4f}]" if low == low else ""))
            else:
                cells.append(f"{s[m]:.4f}" + (f" ± {ci:.4f}" if ci == ci else ""))
        cells += [f"{s['parameters']:,.0f}", f"{s['train_seconds']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    over = "images" if ci_over == "image" else "per-subject means"
    notes = [f"\n± : 95% t-interval over {over}. CLIP-T is given in both conventions, as labelled."]
    if any(m in BINARY for m in shown):
        notes[0] += (" [low, high] of a proportion (" + ", ".join(LABELS[m] for m in BINARY if m in shown) + "): "
                     + ("95% Wilson score interval over images." if ci_over == "image" else
                        "95% t-interval over per-subject proportions, clipped to [0, 1]."))
    notes += [f"- {name} unavailable: {reason}" for name, reason in (unavailable or {}).items() if reason]
    return "\n".join(lines + notes) + "\n"


SETTINGS = "settings.json"
# what the rows of a run depend on; methods and subjects may grow between runs into one folder, the rest may not
SETTING_FIELDS = ("protocol", "data", "model", "max_prompts", "images_per_prompt", "sample_steps", "guidance_scale",
                  "seed", "token", "train", "clip", "dino", "dtype")


def _comparable(settings: dict) -> dict:
    """Settings as they are compared: local paths resolved (``./sd15`` and ``sd15`` are one folder), the token left
    out on the world protocol (each world concept brings its own)."""
    out = dict(settings)
    if isinstance(out.get("train"), dict):
        effective = {method: _effective(method, fields) for method, fields in out["train"].items()}
        out["train"] = {method: fields for method, fields in effective.items() if fields}  # {} is no override
    for key in ("model", "data", "clip", "dino"):
        value = out.get(key)
        if isinstance(value, str) and value and Path(value).expanduser().exists():
            out[key] = str(Path(value).expanduser().resolve())
    out["dtype"] = _DTYPE_NAMES.get(out.get("dtype"), out.get("dtype"))
    if out.get("protocol") == "world":
        out.pop("token", None)
    return out


_DTYPE_NAMES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "torch.float32": "float32",
                "torch.float16": "float16", "torch.bfloat16": "bfloat16"}


# recipe fields that do not change what a run trains: where and how often it keeps checkpoints, whether it resumes
# one (a resumed run continues the same trajectory, or is refused by the checkpoint's own fingerprint)
HOUSEKEEPING = ("checkpoint_dir", "checkpoint_every", "resume")


def _effective(method: str, overrides) -> dict:
    """A method's ``--set`` overrides less those that restate its recipe (or TrainConfig's default where the recipe
    is silent): ``residuals.steps=150`` is the run without it; less ``HOUSEKEEPING``. learning_rate stays: an explicit rate beats the
    model folder's own default, so restating the recipe's changes the run where the folder has one; so does seed
    (the harness trains at its own --seed, not TrainConfig's default)."""
    from dataclasses import MISSING, fields as dc_fields

    from .targets import RECIPES
    from .train_config import TrainConfig

    if not isinstance(overrides, dict):
        return overrides
    recipe = RECIPES.get(method, {})
    defaults = {f.name: f.default for f in dc_fields(TrainConfig) if f.default is not MISSING}
    same = {k for k, v in overrides.items() if k not in ("learning_rate", "seed")  # eval trains at its own seed
            and (recipe[k] if k in recipe else defaults.get(k, MISSING)) == v}
    return {k: v for k, v in overrides.items() if k not in same and k not in HOUSEKEEPING}


def check_settings(out: str | Path, config, done: set, dtype: str | None = None,
                   backbones: dict | None = None) -> dict:
    """The run's settings (``SETTING_FIELDS`` of ``config``), checked against those of the rows already in ``out``
    (its settings.json, else an older version's run.json): a rerun into the same folder with other settings would
    skip finished pairs and mix their rows with new ones, so it is refused, naming the fields. ``done``: the
    finished (method, subject) pairs; recipe overrides (``train``) are compared for their methods only, so a rerun
    may add methods, with their own overrides, and subjects. ``dtype``: the pipeline's dtype as it will run (the
    config's None is fp32 on a CPU, bf16 on most GPUs). ``backbones``: the metric backbones that score
    (``Scorer.backbones``, None where a metric is off or could not be loaded); rows scored with others, or without
    them, are refused too. Local paths are stored resolved, so a rerun from another folder compares the folders, not
    the words typed. Returns the settings (``write_settings`` stores them)."""
    settings = json.loads(json.dumps({k: getattr(config, k) for k in SETTING_FIELDS}, default=str))
    if dtype is not None:
        settings["dtype"] = dtype
    if backbones is not None:
        settings["backbones"] = dict(backbones)
    stored = _comparable(settings)
    settings.update({k: stored[k] for k in ("model", "data", "clip", "dino", "dtype") if k in stored})
    path, old_run = Path(out) / SETTINGS, Path(out) / "run.json"
    saved = None
    if done and path.is_file():
        saved = json.loads(path.read_text(encoding="utf-8"))
    elif done and old_run.is_file():
        saved = (json.loads(old_run.read_text(encoding="utf-8")) or {}).get("config")
    if not saved:
        return settings
    if backbones is None and "backbones" in saved:  # not said (nothing left to score): the rows' own stay recorded
        settings["backbones"] = saved["backbones"]
    ran = {method for method, _ in done}
    now, then = _comparable(settings), _comparable({k: saved.get(k) for k in SETTING_FIELDS})
    now["train"] = {m: v for m, v in (now.get("train") or {}).items() if m in ran}
    then["train"] = {m: v for m, v in (then.get("train") or {}).items() if m in ran}
    if then.get("dtype") is None or now.get("dtype") is None:  # an older settings.json, or a caller that does not
        now.pop("dtype", None)  # say: the dtype as it ran is not known
    differ = [f"{k} ({then.get(k)!r} there, {now.get(k)!r} now)" for k in SETTING_FIELDS
              if k in now and then.get(k) != now.get(k)]
    if differ:
        raise ValueError(f"{str(out)!r} holds results of a run with other settings: {'; '.join(differ)}. "
                         "Rerunning would mix them; pass another --out, or delete that folder to start over")
    _check_backbones(out, saved.get("backbones"), settings.get("backbones"))
    return settings


def _check_backbones(out, then: dict | None, now: dict | None) -> None:
    """Refuse scoring into ``out`` with other metric backbones than its rows had (``None``: that metric not scored);
    unknown on either side (an older settings.json, a caller that does not say): not compared."""
    if not isinstance(then, dict) or not isinstance(now, dict):
        return
    said = lambda v: repr(v) if v else "none (off, or not loadable: see the warning above)"  # noqa: E731
    differ = [f"{name.upper()} ({said(then.get(name))} there, {said(now.get(name))} now)"
              for name in sorted(set(then) | set(now)) if then.get(name) != now.get(name)]
    if differ:
        raise ValueError(f"{str(out)!r} holds rows scored with other metric backbones: {'; '.join(differ)}. Rerunning "
                         "would mix rows scored with and without them (or with another model) in one table; give "
                         "the same backbones (--clip / --dino the folder or hub id it ran with, --download-backbones "
                         "for a hub id not in the cache, 'none' where it had none), or pass another --out")


def write_settings(out: str | Path, settings: dict) -> None:
    from .atomic import atomic_path

    with atomic_path(Path(out) / SETTINGS) as tmp:
        Path(tmp).write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")
