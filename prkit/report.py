"""Headless report: run the notebook series with papermill into ``runs/<timestamp>/`` and render HTML.

``python -m prkit.report [--out runs | --run runs/<timestamp>] [-p name value ...] [--params file.yaml]
[--only 01 02]``. Owns orchestration only: every computation lives in the notebooks and the package.
"""

from __future__ import annotations

import argparse
import ast
import html
import os
import re
import sys
import time
import urllib.parse
from datetime import datetime
from pathlib import Path

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


def _literal(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def notebook_list(folder: Path, only: list[str] | None = None) -> list[Path]:
    """The numbered notebooks ``NN_verb_noun.ipynb`` of ``folder``, in order (optionally filtered by prefix)."""
    books = sorted(p for p in folder.glob("[0-9][0-9]_*.ipynb"))
    if only:
        books = [p for p in books if any(p.name.startswith(o) for o in only)]
    if not books:
        raise FileNotFoundError(f"no notebooks NN_*.ipynb found in {folder}")
    return books


RUN_PATH = re.compile(r"`run_dir/([^`]*)`")  # a run file named in a notebook's first cell: `run_dir/concept/`


def run_paths(book: Path) -> tuple[set[str], set[str]]:
    """The run-folder paths a notebook's first (markdown) cell lists after ``* reads:`` and ``* writes:``."""
    import nbformat

    cells = nbformat.read(book, as_version=4).cells
    text = cells[0].source if cells and cells[0].cell_type == "markdown" else ""
    found: dict[str, set[str]] = {"reads": set(), "writes": set()}
    for item in re.split(r"\n\* ", "\n" + text):  # one bullet each, over as many lines as it takes
        kind = item.split(":", 1)[0].strip()
        if kind in found:
            found[kind] = {p.rstrip("/") for p in RUN_PATH.findall(item)}
    return found["reads"], found["writes"]


def skipped_inputs(series: list[Path], chosen: list[Path]) -> list[str]:
    """What the chosen notebooks read from the run folder that only an earlier notebook of the series left out of
    ``chosen`` writes: ``"03_x.ipynb reads run_dir/residuals.safetensors, which 02_y.ipynb writes"``."""
    paths = {book: run_paths(book) for book in series}
    said = []
    for book in chosen:
        for read in sorted(paths[book][0]):
            writers = [w for w in series[:series.index(book)] if any(
                read == p or read.startswith(p + "/") or p.startswith(read + "/") for p in paths[w][1])]
            if writers and not set(writers) & set(chosen):
                said.append(f"{book.name} reads run_dir/{read}, which {writers[-1].name} writes")
    return said


HEADLESS = {"interactive": False}  # widgets fall back to static figures in a report
# parameters that name files or folders: papermill runs each notebook inside the run folder, so a relative path is
# made absolute against the folder the report was started from (a model or backbone that is no local path is a hub
# id: kept; so is "world", the embedded model, and 06's "auto", its default backbones)
PATH_PARAMETERS = {"concept_folder": "always", "model": "if it exists", "clip_backbone": "if it exists",
                   "dino_backbone": "if it exists"}
AUTO = {"clip_backbone", "dino_backbone"}  # "auto" picks their default, never a folder


def resolve_paths(parameters: dict, base: Path) -> dict:
    """``parameters`` with relative paths of ``PATH_PARAMETERS`` made absolute against ``base``."""
    out = dict(parameters)
    for name, when in PATH_PARAMETERS.items():
        value = out.get(name)
        if not isinstance(value, str) or not value or value == "world" or (value == "auto" and name in AUTO):
            continue
        path = Path(value).expanduser()  # "~/models/sd15" too
        path = path if path.is_absolute() else base / path
        if when == "always" or path.exists():
            out[name] = str(path.resolve())
    return out


INLINE = "module://matplotlib_inline.backend_inline"  # the kernels' figures go into the notebooks (and the HTML)


def declared(notebooks: list[Path]) -> dict[Path, dict[str, str]]:
    """The parameters each notebook's ``parameters`` cell declares, each with its default as written there."""
    import papermill as pm

    return {book: {name: p["default"] for name, p in pm.inspect_notebook(str(book)).items()} for book in notebooks}


def unknown_parameters(parameters: dict, names: dict[Path, dict[str, str]]) -> list[str]:
    """Names in ``parameters`` that no notebook of the series declares (typos: papermill would only warn)."""
    known = set().union(*names.values()) if names else set()
    return sorted(set(parameters) - known)


def unused_parameters(parameters: dict, names: dict[Path, dict[str, str]], chosen: list[Path]) -> list[str]:
    """The parameters that only notebooks left out of ``chosen`` (--only) declare, each with those notebooks:
    ``"train_steps (02_train_residuals.ipynb)"``; the report passes each parameter to the notebooks declaring it."""
    return [f"{name} ({', '.join(b.name for b in names if name in names[b])})" for name in sorted(parameters)
            if not any(name in names[b] for b in chosen) and any(name in names[b] for b in names)]


# a default of this type -> what a value given for it must be (None always passes: the notebook decides)
KINDS = ((bool, (bool,), "True or False"), (int, (int,), "whole number"), (float, (int, float), "number"),
         (list, (list, tuple), "list"))


def wrong_kinds(parameters: dict, names: dict[Path, dict[str, str]]) -> list[str]:
    """Values in ``parameters`` of another kind than the default of a notebook that declares them (papermill would
    hand the string 'false' to a True/False parameter, where it is truthy): ``"x='3OO' is no whole number (...)"``."""
    said = []
    for name, value in parameters.items():
        for book, defaults in names.items():
            default = _literal(defaults.get(name, "None"))
            kind = next((k for k in KINDS if isinstance(default, k[0])), None)
            if kind is None or value is None:
                continue
            if not isinstance(value, kind[1]) or (isinstance(value, bool) and kind[0] is not bool):
                said.append(f"{name}={value!r} is no {kind[2]} (its default in {book.name}: {default!r}); give e.g. "
                            f"-p {name} {default!r}")
                break
    return said


def _failure(err: Exception) -> str:
    """What failed, as papermill reports a cell's error: the cell, the exception and its message."""
    name, value = getattr(err, "ename", None), getattr(err, "evalue", None)
    if name is None:
        return f"failed: {type(err).__name__}: {err}"
    cell = getattr(err, "exec_count", None)
    return f"failed{f' in cell [{cell}]' if cell is not None else ''}: {name}: {value}"


def run_series(out: Path, parameters: dict, notebooks: list[Path], kernel: str = "python3") -> list[dict]:
    """Execute each notebook into ``out`` with papermill, each given the parameters it declares; stop at the first
    failure or Ctrl-C. Figures are drawn inline (a shell's MPLBACKEND=Agg would leave the report without them).
    Returns one row per notebook run."""
    import os

    import papermill as pm

    names = declared(notebooks)
    rows = []
    backend = os.environ.get("MPLBACKEND")
    os.environ["MPLBACKEND"] = INLINE  # the kernels inherit it
    try:
        for i, book in enumerate(notebooks, 1):
            start = time.perf_counter()
            print(f"[{i}/{len(notebooks)}] {book.name} ...", flush=True)
            given = {k: v for k, v in {**HEADLESS, **parameters}.items() if k in names[book]}
            try:
                pm.execute_notebook(str(book), str(out / book.name), parameters={**given, "run_dir": str(out)},
                                    kernel_name=kernel, progress_bar=True, cwd=str(out))
                status = "ok"
            except Exception as err:  # papermill re-raises the cell's error; the executed notebook keeps it
                status = _failure(err)
            except KeyboardInterrupt:  # Ctrl-C: papermill has saved the notebook as far as it ran; the index follows
                status = "interrupted (Ctrl-C)"
            seconds = time.perf_counter() - start
            print(f"[{i}/{len(notebooks)}] {book.name} {status} ({seconds:.0f} s)", flush=True)
            rows.append({"notebook": book.name, "seconds": seconds, "status": status})
            if status != "ok":
                break
    finally:
        if backend is None:
            os.environ.pop("MPLBACKEND", None)
        else:
            os.environ["MPLBACKEND"] = backend
    return rows


def render_html(out: Path, rows: list[dict], parameters: dict | None = None, since: float | None = None) -> Path:
    """Convert the executed notebooks to HTML and write index.html: the notebooks (rows of those not run say so),
    the ``parameters`` the report gave them, and every file of the run folder; with ``since`` (a ``time.time()``),
    those last written before it are listed apart as an earlier run's (``--run``: this one did not write them)."""
    import nbformat
    from nbconvert import HTMLExporter

    exporter = HTMLExporter()
    items = []
    for row in rows:
        book = out / row["notebook"]
        given, status, node = "", row["status"], None
        if book.exists() and row["status"] != "not run":  # a page left by an earlier report is not this run's
            try:
                node = nbformat.read(book, as_version=4)
                body, _ = exporter.from_notebook_node(node)
            except Exception as err:  # noqa: BLE001 - e.g. cut short: papermill saves in place; the index still comes
                why = f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:200]}"
                print(f"{row['notebook']}: no page, {why}; run it again (--only) to remake it", flush=True)
                status, node = f"{status}; its page could not be made: {why} (run it again to remake it)", None
        if node is not None:
            page = book.with_suffix(".html")
            page.write_text(body, encoding="utf-8")
            link = f'<a href="{_href(page.name)}">{_shown(row["notebook"])}</a>'
            ran_with = node.metadata.get("papermill", {}).get("parameters") or {}
            given = ", ".join(f"{k}={v!r}" for k, v in sorted(ran_with.items())
                              if k != "run_dir" and k not in HEADLESS)  # the report's own: the same for every row
        else:
            link = _shown(row["notebook"])
        took = "" if row["status"] in ("not run", "earlier run") else f"{row['seconds']:.0f} s"
        items.append(f"<tr><td>{link}</td><td>{html.escape(status)}</td><td>{took}</td>"
                     f"<td><code>{html.escape(given)}</code></td></tr>")
    index = out / "index.html"
    index.write_text(
        "<!doctype html><html><head><meta charset='utf-8'><title>prkit report</title>"
        "<style>body{font-family:sans-serif;margin:2em}td,th{padding:4px 12px;text-align:left}"
        "img{max-width:32%;margin:4px;vertical-align:top}</style></head>"
        f"<body><h1>prkit report</h1><p>{_shown(out.name)}</p><table><tr><th>notebook</th><th>status</th>"
        f"<th>time</th><th>run with</th></tr>{''.join(items)}</table>{_parameters(parameters or {})}{_outputs(out, since)}</body></html>",
        encoding="utf-8")
    return index


def _parameters(parameters: dict) -> str:
    """The parameters given to the report (-p, --params), each notebook's own default for the rest."""
    if not parameters:
        return "<h2>parameters</h2><p>the notebooks' defaults</p>"
    rows = "".join(f"<tr><td>{html.escape(k)}</td><td><code>{html.escape(repr(v))}</code></td></tr>"
                   for k, v in sorted(parameters.items()))
    return (f"<h2>parameters</h2><p>given to the notebooks that declare them; the others kept their defaults</p>"
            f"<table><tr><th>name</th><th>value</th></tr>{rows}</table>")


def _href(relative: str) -> str:
    """A link target for a path relative to the index: URL-quoted (a '#' or '?' in a file name), then escaped; the
    name's own bytes are quoted (``os.fsencode``), so a name that is no UTF-8 still links to its file."""
    return html.escape(urllib.parse.quote(os.fsencode(relative)))


def _shown(name: str) -> str:
    """A file name as the page shows it, escaped: bytes that are no UTF-8 (a Linux name such as b'\\xff.png', which
    Python holds as a lone surrogate that no UTF-8 page can carry) as their \\xNN escapes."""
    return html.escape(os.fsencode(name).decode("utf-8", "backslashreplace"))


def _outputs(out: Path, since: float | None = None) -> str:
    """Every file of the run folder but index.html, by folder: figures shown (the samples under an ``images``
    folder only linked), everything else linked; files last written before ``since`` under their own headings."""
    by_folder: dict[tuple[bool, str], list[Path]] = {}
    for f in sorted(out.rglob("*")):
        if f.is_file() and f != out / "index.html":
            earlier = since is not None and f.stat().st_mtime < since
            by_folder.setdefault((earlier, f.parent.relative_to(out).as_posix()), []).append(f)
    sections = []
    for (earlier, folder), files in sorted(by_folder.items(), key=lambda item: (item[0][0], item[0][1] != ".",
                                                                               item[0][1])):
        shown = [f for f in files if f.suffix == ".png" and "images" not in f.relative_to(out).parts[:-1]]
        figures = "".join(f'<a href="{_href(f.relative_to(out).as_posix())}"><img alt="{_shown(f.name)}" '
                          f'src="{_href(f.relative_to(out).as_posix())}"></a>' for f in shown)
        links = "".join(f'<li><a href="{_href(f.relative_to(out).as_posix())}">'
                        f'{_shown(f.relative_to(out).as_posix())}</a></li>' for f in files if f not in shown)
        title = ("run folder" if folder == "." else f"{folder}/") + (" (an earlier run's, not written by this "
                                                                     "one)" if earlier else "")
        sections.append(f"<h2>{_shown(title)}</h2>{figures}{f'<ul>{links}</ul>' if links else ''}")
    return "".join(sections)


def _new_run_folder(parent: Path) -> Path:
    """``parent/<timestamp>``, or ``<timestamp>-2``, ... when a run started in the same second already took it."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    for n in range(1, 1000):
        out = parent / (stamp if n == 1 else f"{stamp}-{n}")
        try:
            out.mkdir(parents=True, exist_ok=False)
            return out.resolve()
        except FileExistsError:
            continue
    raise FileExistsError(f"could not make a new run folder under {parent}")


# YAML 1.2's numbers in exponent form that PyYAML (YAML 1.1) reads as strings: 1e-3 (no dot), 1.5e10 (no sign)
EXPONENT = re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$")


def read_params(text: str) -> object:
    """A ``--params`` file's YAML, its unquoted numbers in exponent form (``learning_rate: 1e-3``) read as numbers,
    as YAML 1.2 and Python read them; PyYAML left them strings, which reached the notebooks as such."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_implicit_resolver("tag:yaml.org,2002:float", EXPONENT, list("-+0123456789."))
    return yaml.load(text, Loader=Loader)  # noqa: S506 - a SafeLoader


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m prkit.report", description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="parent folder of the new run folder (default: runs)")
    parser.add_argument("--run", help="run the notebooks in this existing run folder (e.g. runs/<timestamp>, where "
                                      "earlier notebooks ran) instead of a new one; with --only, a subset")
    parser.add_argument("--notebooks", default=str(NOTEBOOKS))
    parser.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"))
    parser.add_argument("--params", help="YAML file of parameters (e.g. notebooks/params/sd15.yaml)")
    parser.add_argument("--only", nargs="+", help="run only notebooks with these prefixes (e.g. 01 02)")
    parser.add_argument("--kernel", default="python3")
    args = parser.parse_args(argv)
    for flag in ("--out", "--run", "--notebooks", "--params"):  # Path("") is the current folder: --run "" ran there
        if getattr(args, flag[2:]) == "":
            parser.error(f"{flag} is empty; give a path (an unset shell variable?)")
    parameters: dict = {}
    if args.params:
        import yaml

        params_file = Path(args.params).expanduser()
        try:
            given = read_params(params_file.read_text()) or {}
        except OSError as err:
            parser.error(f"--params {args.params}: {err.strerror or err}")
        except yaml.YAMLError as err:
            parser.error(f"--params {args.params} is no valid YAML: {err}")
        if not isinstance(given, dict):
            parser.error(f"--params {args.params} must hold 'name: value' lines (a mapping), not a "
                         f"{type(given).__name__}: e.g. 'train_steps: 300'")
        # a YAML file's relative paths are its own folder's (notebooks/params/sd15.yaml works from anywhere)
        parameters.update(resolve_paths(given, params_file.resolve().parent))
    parameters.update(resolve_paths({k: _literal(v) for k, v in args.parameter}, Path.cwd()))
    try:
        books = notebook_list(Path(args.notebooks), args.only)
    except FileNotFoundError as err:
        only = f" with the prefixes --only {' '.join(args.only)}" if args.only else ""
        parser.error(f"{err}{only}")
    if "run_dir" in parameters:  # every notebook of a report runs in the report's own timestamped folder
        parser.error("run_dir is set by the report (a new folder under --out per run); pass --out instead, or "
                     "--run runs/<timestamp> to run in an existing run folder")
    series = notebook_list(Path(args.notebooks))
    names = declared(series)
    unknown = unknown_parameters(parameters, names)  # --only or not
    if unknown:
        parser.error(f"no notebook of this series has the parameter(s) {', '.join(unknown)}: check the spelling "
                     f"against the notebooks' parameters cells")
    wrong = wrong_kinds(parameters, names)
    if wrong:
        parser.error(f"{'; '.join(wrong)}. -p values are Python literals (True, 3, 0.5, '[\"a\", \"b\"]')")
    unused = unused_parameters(parameters, names, books)
    if unused:  # known to the series (a --params file's, say), but none of the notebooks run takes them
        print(f"note: --only {' '.join(args.only)} runs no notebook that takes {'; '.join(unused)}: not used",
              flush=True)
    if args.run is not None and args.out is not None:
        parser.error("--out makes a new run folder and --run reuses one: pass one of them")
    if args.out is not None and Path(args.out).expanduser().exists() and not Path(args.out).expanduser().is_dir():
        parser.error(f"--out {args.out} is a file; give the folder to make the run folder in (default: runs)")
    if args.run is None:
        skipped = skipped_inputs(series, books)
        if skipped:
            parser.error(f"--only {' '.join(args.only)} skips notebooks whose files the rest need, and a new run "
                         f"folder has none: {'; '.join(skipped)}. Pass --run runs/<timestamp> (a run folder where "
                         f"those ran) or add them to --only")
        out = _new_run_folder(Path(args.out or "runs").expanduser())  # --out=~/runs: no shell expands it
    else:
        out = Path(args.run).expanduser().resolve()
        if not out.is_dir():
            parser.error(f"--run {args.run}: no such folder; give a run folder of an earlier report "
                         f"(runs/<timestamp>), or --out to make a new one")
        if any((out / b.name).resolve() == b.resolve() for b in series):  # executed copies would overwrite them
            parser.error(f"--run {args.run} is the folder of the notebooks themselves; give a run folder of an "
                         f"earlier report (runs/<timestamp>)")
    start, started = time.perf_counter(), time.time() - 2  # 2 s: file systems that keep whole or even seconds
    rows = run_series(out, parameters, books, args.kernel)
    rows += [{"notebook": b.name, "seconds": 0.0, "status": "not run"} for b in books[len(rows):]]
    ok = bool(rows) and all(r["status"] == "ok" for r in rows)
    earlier = [{"notebook": b.name, "seconds": 0.0, "status": "earlier run"} for b in series
               if b not in books and (out / b.name).is_file()]  # --run: what ran there before stays listed
    index = render_html(out, sorted(rows + earlier, key=lambda r: r["notebook"]), parameters, since=started)
    print(f"report: {index} ({time.perf_counter() - start:.0f} s, {'all ok' if ok else 'FAILED'})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
