"""The README's code, held to the code: its Python snippets run on the embedded world, every command line it shows
(and every flag it names in its prose) is accepted by that command's parser, and every prkit name and keyword its
inline calls use exists with that name.

These read README.md itself, so a README edit that drifts from the code (or a code change that leaves the README
behind) fails here."""

from __future__ import annotations

import argparse
import ast
import contextlib
import importlib
import inspect
import io
import os
import re
import shlex
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
WORLD_CONCEPT = ROOT / "prkit" / "world" / "concepts" / "striped_ball"


# ------------------------------------------------------------------------------------------ reading the README

def sections(text: str) -> list[tuple[str, str]]:
    """(heading, body) of each ``##``/``###`` section, code blocks included, in order ("" for the text before)."""
    parts = re.split(r"^(#{2,3} .*)$", text, flags=re.M)
    out = [("", parts[0])]
    for heading, body in zip(parts[1::2], parts[2::2]):
        out.append((heading.lstrip("# ").strip(), heading + "\n" + body))
    return out


FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)


def code_blocks(text: str, language: str) -> list[str]:
    return [body for lang, body in FENCE.findall(text) if lang == language]


def prose(text: str) -> str:
    """The text without its fenced code blocks."""
    return FENCE.sub("", text)


def spans(text: str) -> list[str]:
    """Inline code spans (`...`), also those that wrap over a line break, as one line."""
    return [" ".join(s.split()) for s in re.findall(r"`([^`]+)`", prose(text))]


def sentences(text: str) -> list[str]:
    """The prose cut into sentences (a full stop or closing bracket, then a capital or a code span); "e.g." and
    "i.e." do not end one."""
    pieces = re.split(r"(?<=[.!?)])\s+(?=[A-Z`])", " ".join(prose(text).split()))
    out: list[str] = []
    for piece in pieces:
        if out and out[-1].endswith(("e.g.", "i.e.")):
            out[-1] += " " + piece
        else:
            out.append(piece)
    return out


# ------------------------------------------------------------------------------------------ the parsers

class _Parser(Exception):
    def __init__(self, parser):
        self.parser = parser


def module_parser(module: str) -> argparse.ArgumentParser:
    """The parser ``python -m <module>`` builds, taken as its ``main`` is about to parse (nothing runs)."""
    main = importlib.import_module(module).main

    def caught(self, *args, **kwargs):
        raise _Parser(self)

    original = argparse.ArgumentParser.parse_args
    argparse.ArgumentParser.parse_args = caught
    try:
        main([])
    except _Parser as got:
        return got.parser
    finally:
        argparse.ArgumentParser.parse_args = original
    raise AssertionError(f"python -m {module} parsed no arguments")


MODULES = ("prkit.evaluate", "prkit.report", "prkit.world.train", "prkit.world.clip", "prkit.world.bench")


def prkit_parser() -> argparse.ArgumentParser:
    from prkit.cli import build_parser

    return build_parser()


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


def parsers() -> dict[str, argparse.ArgumentParser]:
    """"prkit train", "prkit sample", ... and "python -m prkit.report", ... -> the parser of that command."""
    out = {f"prkit {name}": sub for name, sub in subcommands(prkit_parser()).items()}
    out.update({f"python -m {module}": module_parser(module) for module in MODULES})
    return out


def required_args(parser: argparse.ArgumentParser, given: list[str]) -> list[str]:
    """Placeholder values for what ``parser`` requires and ``given`` lacks (positionals, required options)."""
    out: list[str] = []
    for action in parser._actions:
        if action.option_strings:
            if action.required and not set(action.option_strings) & {g.split("=")[0] for g in given}:
                out += [action.option_strings[0], "x.safetensors"]
        elif not isinstance(action, argparse._SubParsersAction):
            out.append("x.safetensors")
    return out


def parse(command: str, argv: list[str], parsers: dict) -> str | None:
    """Parse ``argv`` (the words after ``command``) with that command's parser, nothing run; each option must be
    spelt as the parser spells it (no abbreviation). The error, or None."""
    parser = parsers[command]
    options = [word.split("=")[0] for word in argv if re.match(r"^-{1,2}[A-Za-z]", word)]
    unknown = [o for o in options if o not in parser._option_string_actions]
    if unknown:
        return f"{command}: no option {', '.join(unknown)} (has: {', '.join(sorted(parser._option_string_actions))})"
    given = argv
    if command.startswith("prkit "):  # through the top-level parser, as `prkit` parses it
        parser, argv = prkit_parser(), [command.split()[1], *argv]
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            parser.parse_args(argv)
    except SystemExit:
        return f"{command} {shlex.join(given)}: {err.getvalue().strip().splitlines()[-1]}"
    return None


def as_command(words: list[str]) -> tuple[str, list[str]] | None:
    """("prkit sample", [its arguments]) or ("python -m prkit.report", [...]) for a command line; None for others."""
    if words[:1] == ["prkit"] and len(words) > 1:
        return f"prkit {words[1]}", words[2:]
    if "-m" in words:
        at = words.index("-m")
        module = words[at + 1] if at + 1 < len(words) else ""
        if module == "prkit" and len(words) > at + 2:
            return f"prkit {words[at + 2]}", words[at + 3:]
        if module.startswith("prkit."):
            return f"python -m {module}", words[at + 2:]
    return None


def readme_commands(text: str) -> list[tuple[str, list[str], str]]:
    """Every prkit command line of the README: (command, arguments, as written), from its shell blocks, its inline
    code and ``make demo ARGS="..."`` (the report's arguments)."""
    lines: list[str] = []
    for block in code_blocks(text, "bash"):
        lines += block.replace("\\\n", " ").splitlines()
    lines += spans(text)
    out = []
    for line in lines:
        args = re.search(r"\bARGS=(\"[^\"]*\"|'[^']*')", line)
        if args:  # make demo ARGS="...": the report's arguments
            out.append(("python -m prkit.report", shlex.split(shlex.split(args.group(1))[0]), line))
            continue
        try:
            words = shlex.split(line, comments=True)
        except ValueError:  # a span of prose with an apostrophe
            continue
        found = as_command(words) if words else None
        if found:
            out.append((*found, line))
    return out


def readme_command_lines(text: str) -> list[tuple[str, list[str], str]]:
    """The README's command lines that give arguments (a bare `prkit info` in a sentence names the command)."""
    return [(c, a, line) for c, a, line in readme_commands(text) if a or line.startswith("python -m prkit.")]


def prose_flags(text: str) -> list[tuple[str, list[str], str]]:
    """Every flag the README's prose names in its own code span (`--no-lag`, `--offload model|sequential`), with
    the commands it belongs to: the one named last before it in its sentence, else those its section names."""
    found = []
    for heading, body in sections(text):
        section_commands = {c for c, _, _ in readme_commands(body)} | set(_named(body))
        for sentence in sentences(body):
            for match in re.finditer(r"`(-{1,2}[A-Za-z][^`]*)`", sentence):
                before = _named(sentence[:match.start()])
                owners = [before[-1]] if before else sorted(section_commands)
                assert owners, f"README section {heading!r}: no command to check `{match.group(1)}` against"
                found.append((match.group(1), owners, sentence))
    return found


def _named(text: str) -> list[str]:
    """The commands named in ``text``, in order: `prkit train`, `python -m prkit.report ...`."""
    out = []
    for span in re.findall(r"`([^`]+)`", prose(text)):
        try:
            words = shlex.split(span)
        except ValueError:
            continue
        if words and (found := as_command(words)):
            out.append(found[0])
    return out


# ------------------------------------------------------------------------------------------ the tests

TEXT = README.read_text(encoding="utf-8")


def test_every_command_line_of_the_readme_parses():
    """Each `prkit ...` / `python -m prkit... ...` line (shell blocks and inline code) is accepted as written by its
    parser, options spelt in full; nothing runs."""
    commands = readme_command_lines(TEXT)
    known = parsers()
    names = {c for c, _, _ in commands}
    assert {"prkit train", "prkit sample", "prkit info", "prkit export", "prkit eval"} <= names, names
    errors = [f"{line!r}: {command} is no command" if command not in known else
              parse(command, argv if argv else required_args(known[command], argv), known)
              for command, argv, line in commands]
    assert not [e for e in errors if e], "\n".join(e for e in errors if e)


def test_every_flag_the_readme_names_is_accepted():
    """`--no-lag`, `--offload model|sequential`, `--mixed-precision auto|no|bf16|fp16`, `--checkpoint-every 0`, ...:
    each flag named in the prose exists, spelt so, on the command its sentence (else its section) names, and each
    value it shows (every alternative of a|b|c) parses."""
    known = parsers()
    flags = prose_flags(TEXT)
    assert len(flags) > 20, flags
    errors = []
    for span, owners, sentence in flags:
        flag, *value = span.split(None, 1)
        values = value[0].split("|") if value else []
        if "=" in flag and not flag.startswith("-p"):  # --out=~/x
            flag, assigned = flag.split("=", 1)
            values = [assigned]
        if not set(owners) <= set(known):
            errors.append(f"`{span}` (in: {sentence[:100]}...): no such command among {owners}")
            continue
        taken = [o for o in owners if flag in known[o]._option_string_actions]
        if not taken:
            errors.append(f"`{span}` (in: {sentence[:100]}...): none of {owners} has {flag}")
            continue
        for command in taken:
            for item in values or [None]:
                argv = [flag] + ([] if item is None else shlex.split(item))
                action = known[command]._option_string_actions[flag]
                if item is None and action.nargs != 0:  # named without a value: one it takes
                    argv.append(_example(action))
                error = parse(command, required_args(known[command], argv) + argv, known)
                if error:
                    errors.append(f"`{span}`: {error}")
    assert not errors, "\n".join(errors)


def _example(action: argparse.Action) -> str:
    """A value the option takes, for a flag the README names without one."""
    if action.choices:
        return str(next(iter(action.choices)))
    for value in ("1", "8", "0.5", "x.safetensors"):
        try:
            if action.type:
                action.type(value)
        except (argparse.ArgumentTypeError, TypeError, ValueError):
            continue
        return value
    raise AssertionError(f"no example value for {action.option_strings}")


def test_a_flag_the_parser_lacks_is_caught():
    """The checks above fail on drift: an option the parser does not have, a value it refuses, an abbreviation."""
    known = parsers()
    assert parse("prkit sample", ["--prompt", "p", "--lag-mode", "soft"], known)
    assert parse("prkit sample", ["--prompt", "p", "--lag-threshold", "huge"], known)
    assert parse("prkit train", ["--images", "i", "--out", "o.safetensors", "--checkpoint", "5"], known)
    assert parse("prkit sample", ["--prompt", "p", "--offload", "model"], known) is None
    broken = TEXT.replace("--offload model|sequential", "--offload model|cpu")
    assert broken != TEXT
    flags = [f for f in prose_flags(broken) if f[0].startswith("--offload")]
    assert [o for _, o, _ in flags] == [["prkit sample"]]
    assert parse("prkit sample", ["--prompt", "p", "--offload", "cpu"], known)
    broken = TEXT.replace("--lora-scale 0.8", "--lora-weight 0.8")
    assert broken != TEXT
    errors = [parse(c, a, known) for c, a, _ in readme_command_lines(broken) if c in known]
    assert any(e and "--lora-weight" in e for e in errors), errors


# ---- the names and keywords of the inline Python calls

def inline_calls(text: str) -> list[tuple[str, ast.Call]]:
    """Each call in the README's inline code that parses as Python (``with`` blocks and assignments too)."""
    out = []
    for span in spans(text):
        source = span.rstrip(":")
        for candidate in (source, source + ": pass"):
            try:
                tree = ast.parse(candidate)
            except SyntaxError:
                continue
            out += [(span, node) for node in ast.walk(tree) if isinstance(node, ast.Call)]
            break
    return out


def _resolve(node: ast.expr):
    """The prkit object a call names: ``prkit.x.y``, or an exported name alone (``generate``), else None."""
    import prkit

    dotted = []
    while isinstance(node, ast.Attribute):
        dotted.insert(0, node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    if node.id == "prkit":
        target = prkit
        path = "prkit"
        for part in dotted:
            path += "." + part
            try:
                target = getattr(target, part)
            except AttributeError:
                target = importlib.import_module(path)  # a submodule (prkit.world.oracle); ImportError: not there
        return target
    if node.id in prkit.__all__ and not dotted:
        return getattr(prkit, node.id)
    if node.id == "residuals" and len(dotted) == 1:  # a set: `residuals.merge()`
        return getattr(prkit.Residuals, dotted[0])
    if node.id == "FastConfig" and not dotted:
        from prkit.fast import FastConfig
        return FastConfig
    return None


def test_inline_calls_name_what_exists_with_its_keywords():
    """`prkit.add_residuals(unet, rank=0.05, name=...)`, `load_concept(..., prompt_template=...)`,
    `with prkit.lag_sampling(pipe, [a, b], prompt)`, `AttentionStore(tokens=positions)`, ...: each prkit function
    named exists and takes the keywords (and as many positional arguments) the README gives it."""
    checked, errors = [], []
    for span, call in inline_calls(TEXT):
        try:
            target = _resolve(call.func)
        except (AttributeError, ImportError) as err:
            errors.append(f"`{span}`: {err}")
            continue
        if target is None:
            continue
        positional = [a for a in call.args if not (isinstance(a, ast.Constant) and a.value is Ellipsis)]
        keywords = {k.arg: None for k in call.keywords if k.arg}
        try:
            inspect.signature(target).bind_partial(*positional, **keywords)
        except TypeError as err:
            errors.append(f"`{span}`: {ast.unparse(call.func)}: {err}")
        checked.append(ast.unparse(call.func))
    assert not errors, "\n".join(errors)
    for name in ("residuals.merge", "residuals.save", "prkit.add_residuals", "prkit.load_residuals", "prkit.export_lora", "prkit.lag_sampling",
                 "prkit.capture_attention", "prkit.prompt_tokens", "load_concept", "train_residuals"):
        assert name in checked, (name, sorted(set(checked)))


def test_the_readme_names_only_prkit_attributes_that_exist():
    """`prkit.residual_layer.ResidualProjection`, `prkit.world.oracle.read`, `prkit.fast`, ... resolve."""
    names = sorted({m for s in spans(TEXT) for m in re.findall(r"\bprkit(?:\.[A-Za-z_]\w*)+", s)})
    assert "prkit.world.oracle.read" in names, names
    errors = []
    for name in names:
        try:
            _resolve(ast.parse(name, mode="eval").body)
        except (AttributeError, ImportError) as err:
            errors.append(f"{name}: {err}")
    assert not errors, errors


def test_the_lag_thresholds_the_readme_lists_are_the_parsers():
    """`--lag-threshold` (median, mean, otsu, fixed, soft): the choices as the parser and prkit.lag have them."""
    from prkit.lag import THRESHOLDS

    listed = re.search(r"`--lag-threshold` \(([a-z, ]+)\)", " ".join(TEXT.split()))
    assert listed, "the README no longer lists --lag-threshold's choices"
    choices = subcommands(prkit_parser())["sample"]._option_string_actions["--lag-threshold"].choices
    assert [c.strip() for c in listed.group(1).split(",")] == list(choices) == list(THRESHOLDS)


def test_a_wrong_keyword_or_name_in_an_inline_call_is_caught():
    for wrong in ("`residuals.merge_all()`", "`prkit.add_residuals(unet, rank=0.05, label=...)`", "`prkit.lag_sampling(pipe, sets, p, q, r, s)`",
                  "`prkit.remove_all_residuals(unet)`"):
        calls = [(s, c) for s, c in inline_calls(wrong)]
        assert calls
        with pytest.raises((TypeError, AttributeError, ImportError)):
            target = _resolve(calls[0][1].func)
            inspect.signature(target).bind_partial(*calls[0][1].args, **{k.arg: None for k in calls[0][1].keywords})


# ---- the Python snippets, run on the world

def python_snippets(text: str) -> list[str]:
    """The README's ```python blocks that run on the embedded world (they load it: ``load_pipeline("world")``)."""
    return [block for block in code_blocks(text, "python") if 'load_pipeline("world")' in block]


def run_snippet(source: str, folder: Path) -> dict:
    """Run a README snippet as a user would, in ``folder``; a concept folder it names that is not there (the
    user's photos, "my_dog/") is made from the world's striped ball."""
    for name in re.findall(r"load_concept\(\s*[\"']([^\"']+)[\"']", source):
        target = folder / name
        if not target.exists():
            target.mkdir(parents=True)
            for image in WORLD_CONCEPT.glob("*.png"):
                shutil.copy(image, target)
    namespace: dict = {"__name__": "__readme__"}
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        exec(compile(source, f"README.md snippet in {folder}", "exec"), namespace)  # noqa: S102 - the README's code
    finally:
        os.chdir(cwd)
    return namespace


def test_use_it_from_python_runs_on_the_world_as_written(tmp_path):
    """The "Use it from Python" snippet, unchanged, on the world: 150 steps of batch 4 at the world's 1e-2, four
    64 px images with LAG, and a residual file with the words, base model and recipe its comments promise."""
    import prkit

    section = dict(sections(TEXT))["Use it from Python"]
    snippets = python_snippets(section)
    assert len(snippets) == 1, "the section's snippet no longer loads the world"
    assert python_snippets(TEXT) == snippets, "a new world snippet: run it here too"
    ns = run_snippet(snippets[0], tmp_path)
    pipe, result, images = ns["pipe"], ns["result"], ns["images"]
    assert prkit.native_resolution(pipe) == 64  # "64 on the world"
    assert result.steps_done == 150 and result.completed
    assert len(images) == 4 and all(image.size == (64, 64) for image in images)
    assert ns["residuals"].num_parameters() == 9600  # the world's figure the README gives (rank 5% of channels)
    meta = prkit.read_metadata(tmp_path / "sks_dog.safetensors")
    assert (meta["token"], meta["class_word"], meta["base_model"]) == ("sks", "dog", "world")
    assert meta["layers"] and all("rank" in layer for layer in meta["layers"].values())
    config = meta["config"]  # "150 steps, batch 4, AdamW 1e-3 (the world: 1e-2)"
    assert (config["steps"], config["batch_size"], config["learning_rate"]) == (150, 4, 0.01)


def test_a_broken_snippet_fails(tmp_path):
    """The snippet test runs the README's text: a wrong keyword there fails it (the run stops at once)."""
    broken = python_snippets(TEXT)[0].replace("num_images=4", "n_images=4").replace(
        "prkit.train_residuals(pipe, concept)", "prkit.train_residuals(pipe, concept, steps=1)")
    with pytest.raises(TypeError, match="n_images"):
        run_snippet(broken, tmp_path)


def test_the_layout_names_every_module_and_benchmark_script():
    """## Layout lists prkit's modules and the benchmark scripts: each one there exists, and each one that exists
    is there (eval_cli.py, eval_config.py and revisions.py were missing)."""
    layout = dict(sections(TEXT))["Layout"]
    named = set(re.findall(r"\b([a-z_0-9]+\.py)\b", layout))
    modules = {p.name for p in (ROOT / "prkit").glob("*.py") if not p.name.startswith("__")}
    scripts = {p.name for p in (ROOT / "benchmarks").glob("*.py") if not p.name.startswith("world_")}  # world_*.py
    assert modules - named == set(), f"prkit modules the Layout does not name: {sorted(modules - named)}"
    assert scripts - named == set(), f"benchmark scripts the Layout does not name: {sorted(scripts - named)}"
    assert named - modules - scripts == set(), f"the Layout names what is not there: {sorted(named - modules - scripts)}"


def test_every_data_file_of_the_package_ships_with_it():
    """pyproject's package data covers every file of the package that is no Python source: an installed (non-editable)
    prkit lacked prkit/METHOD.md, the method the README links and the docstrings cite for their defaults."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"][
        "package-data"]
    shipped = {path for package, patterns in package_data.items() for pattern in patterns
               for path in (ROOT / package.replace(".", "/")).glob(pattern) if path.is_file()}
    data = {path for path in (ROOT / "prkit").rglob("*") if path.is_file() and path.suffix not in (".py", ".pyc")
            and "__pycache__" not in path.parts and ".ipynb_checkpoints" not in path.parts}
    assert ROOT / "prkit" / "METHOD.md" in data
    assert sorted(str(p.relative_to(ROOT)) for p in data - shipped) == []
