"""How the command line speaks: the library's messages, warnings and log lines in the flags' words, and
third-party progress bars off where there is no terminal to draw them on."""

from __future__ import annotations

import logging
import warnings

from .eval_results import SETTING_FIELDS  # (the standard library only: no torch here)


def _halves(flag: str, load: str) -> tuple:
    """train.py's refusal of a mixed precision in the other half precision than the UNet's, in a command's words:
    ``flag`` sets the precision, ``load`` says how to load the model in the one asked for ({asked}, {stored})."""
    return tuple((f"mixed_precision={a!r} on a UNet stored in {s}: the two half precisions cannot mix in one step. "
                  f"Use mixed_precision='auto' or {s!r}, or load the pipeline in {a} (prkit.load_pipeline(..., "
                  f"dtype={a!r}))",
                  f"{flag}{a} on a UNet loaded in {s}: the two half precisions cannot mix in one step. Use {flag}auto "
                  f"or {s}{load.format(asked=a, stored=s)}") for a, s in (("fp16", "bf16"), ("bf16", "fp16")))


# checkpoints.resume_hint's words for a run that did not finish (without importing torch here)
RESUME_HINT = "call again with resume=True (CLI: without --no-resume) to resume; resume=False would start over again"
PRECISIONS = ("auto", "no", "bf16", "fp16")  # train_config.PRECISIONS, without importing torch here
# the library's words for a setting that only `prkit train` has a flag for, as it spells them (train has no --dtype:
# on a GPU it loads the model in bf16, or fp16 where bf16 is not native)
TRAIN_WORDS = _halves("--mixed-precision ", " (prkit train loads the model in {stored} on this GPU and has no flag to "
                                            "load it in {asked})") + (
               (RESUME_HINT, "run the command again without --no-resume to resume; with --no-resume it would start "
                "over again"),
               ("resume=False (CLI: --no-resume)", "--no-resume"), ("resume=False", "--no-resume"),
               ("skip_bad=True", "--skip-bad"), ("checkpoint_dir", "--checkpoint-dir"),
               ("Lower learning_rate", "Lower --lr"),
               # a value as the flag takes it, not as Python's repr (--mixed-precision bf16, not 'bf16')
               *((f"mixed_precision={value!r}", f"--mixed-precision {value}") for value in PRECISIONS),
               *((f"(this run's 'auto' is {value!r} on its device)",
                  f"(this run's --mixed-precision auto is {value} on its device)") for value in PRECISIONS),
               ("mixed_precision=", "--mixed-precision "),
               ("past this run's steps=", "past this run's --steps "),
               ("load them with load_concept(..., resolution=", "pass --resolution "),  # N, the model's side
               (") (prkit.native_resolution(pipe))", ", the model's native size (or leave --resolution out)"))
# the same for `prkit eval`, whose training settings are --set's fields (as the library spells them: "checkpoint_dir"
# alone is a field there, not a flag), said as --set METHOD.FIELD=VALUE; what it has no setting for, left out
EVAL_WORDS = _halves("--set METHOD.mixed_precision=", ", or pass --dtype {asked}") + (
    (RESUME_HINT, "run the command again with --set METHOD.resume=True to resume; with METHOD.resume=False it would "
     "start over again"),
    ("resume=False (CLI: --no-resume)", "--set METHOD.resume=False"),
    ("another checkpoint_dir", "another --set METHOD.checkpoint_dir"),
    ("past this run's steps=", "past this run's --set METHOD.steps="),
    ("Lower learning_rate", "Lower --set METHOD.learning_rate"),
    (" or use mixed_precision=", " or use --set METHOD.mixed_precision="),
    ("train at its precision: mixed_precision=", "train at its precision: --set METHOD.mixed_precision="),
    (", or pass skip_bad=True to skip it.", " (prkit eval has no --skip-bad)."),  # the datasets' images: all read
    ("point load_dreambooth at", "point --data at"),  # a --data folder that is no DreamBooth dataset
    # a rerun into one --out with other settings: the fields that differ, as their flags (train: --set)
    *((f"{before}{field} (", f"{before}--{'set' if field == 'train' else field.replace('_', '-')} (")
      for field in SETTING_FIELDS for before in ("other settings: ", "now); ")),
    # a checkpoint not written (train._kept_on_the_model; run_job's set is 'trained'): the command's model ends with
    # it, the rows of the jobs before are kept, and a rerun resumes the job from its last checkpoint (or starts over)
    ("The residual set 'trained' stays on the model with the weights it had trained: save it where there is room "
     "(prkit.save_residuals(prkit.get_residuals(pipe.unet, 'trained'), path)) before calling train_residuals again, "
     "which replaces it, ", "The residuals this job trained end with the command; the jobs finished before it keep "
     "their rows in --out. Once the checkpoint can be written there, run the same command again: it runs the jobs "
     "left, this one "))
# the library's words for a setting, as every command spells it (errors raised by the library name arguments)
CLI_WORDS = (("(pass token=... to add_residuals/load_residuals, or sample with lag=False)",
              "(train it again with --token, or sample with --no-lag)"),
             ("or load a folder written by Concept.save() whose concept.json holds it.",
              'or put a concept.json holding "token" and "class_word" in the images folder.'),
             ("use device='cpu', 'cuda' or 'auto'", "use --device cpu, cuda or auto"),
             ("use device='cpu' or 'auto'", "use --device cpu or auto"),
             ("(the CPU default, dtype=None)", "(the CPU default: leave --dtype out)"),
             ("lag=False", "--no-lag"), ("token is required: pass token=...", "--token is required: pass --token"),
             ("class_word is required: pass class_word=...", "--class-word is required: pass --class-word"),
             ("(e.g. token='sks', class_word='dog')", "(e.g. --token sks --class-word dog)"),
             ("model='world'", "--model world"), ("(download=False)", "(add --download-backbones)"),
             ("LoRA files load with pipe.load_lora_weights", "LoRA files load with --lora (pipe.load_lora_weights)"))


def _cli_words(message: str, command: str) -> str:
    """``message`` in the words of ``prkit <command>``'s flags."""
    for library, flag in {"train": TRAIN_WORDS, "eval": EVAL_WORDS}.get(command, ()) + CLI_WORDS:
        message = message.replace(library, flag)
    return message


def _error_line(err: BaseException, command: str) -> str:
    """``err`` as ``prkit <command>: error: ...`` says it: the eval job it was raised in (``prkit_job``, "residuals on
    'dog'"), then its message in the command's words."""
    job = getattr(err, "prkit_job", None)
    return (f"{job}: " if job else "") + _cli_words(str(err), command)


class _CliWordsFormatter(logging.Formatter):
    """Log lines in the command line's words (the library's name arguments: download=False, checkpoint_dir); the
    record itself is left as it is for other handlers."""

    def __init__(self, inner: logging.Formatter | None, command: str):
        super().__init__()
        self.inner, self.command = inner or logging.Formatter(), command

    def format(self, record: logging.LogRecord) -> str:
        return _cli_words(self.inner.format(record), self.command)


def _in_cli_words(command: str):
    """prkit's own warnings as one line, "prkit <command>: warning: ..." (they printed cli.py's path and source
    line), other libraries' with their category; log lines in the command line's words. Returns the undo."""
    format_before, handlers = warnings.formatwarning, list(logging.getLogger().handlers)

    def one_line(message, category, filename, lineno, line=None):
        if category is UserWarning or "prkit" in str(filename):
            return f"prkit {command}: warning: {_cli_words(str(message), command)}\n"
        return format_before(message, category, filename, lineno, line)

    warnings.formatwarning = one_line
    formatters = [(handler, handler.formatter) for handler in handlers]
    for handler, formatter in formatters:
        handler.setFormatter(_CliWordsFormatter(formatter, command))

    def undo():
        warnings.formatwarning = format_before
        for handler, formatter in formatters:
            handler.setFormatter(formatter)
    return undo


def _library_bars_off():
    """diffusers' and transformers' loading bars off (no terminal to draw them on); returns the undo, which puts
    back each switch as it was (transformers' also switches huggingface_hub's)."""
    import diffusers.utils.logging as diffusers_logging
    import transformers.utils.logging as transformers_logging

    import huggingface_hub.utils as hub

    hub_off = hub.are_progress_bars_disabled()
    was = [(m, m.is_progress_bar_enabled()) for m in (diffusers_logging, transformers_logging)]
    for module, _ in was:
        module.disable_progress_bar()

    def undo():
        for module, on in was:
            if on:
                module.enable_progress_bar()
        if hub_off and not hub.are_progress_bars_disabled():  # transformers' switch turned the hub's back on
            hub.disable_progress_bars()
    return undo
