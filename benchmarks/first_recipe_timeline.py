"""Where a fresh process's first SD1.5 recipe spends its time before the steps: a per-thread timeline.

    python benchmarks/first_recipe_timeline.py --out DIR --tag 1                    # as the fast loop runs now
    python benchmarks/first_recipe_timeline.py --out DIR --tag 1 --variant beside   # the experiments of run 19
    python benchmarks/first_recipe_timeline.py --out DIR --tag p1 --profile         # + cProfile of both recipes
    python benchmarks/first_recipe_timeline.py --tiny --out DIR                     # CPU smoke test

Builds the random-weight pipeline of ``bench.py`` and runs the fast recipe twice through the public API (the
process's first, then a later one), recording when each thread enters and leaves the latents' and the prompt's
encoding, the capture (its forward, backward and graph instantiation) and the first replay, each encoding synced
on its own stream. Writes DIR/timeline_<variant>_<tag>.json (results and events) and prints one line per recipe.
Run each tag in a fresh process, after one throwaway process that compiles the kernels for the machine.

Variants (BENCHMARKS.md run 19; each patches the loop from outside, for measurement only):
- ``now``: the fast loop as it is.
- ``beside``: the capture does not wait for the latents (it runs beside their encoding).
- ``textbg``: ``beside``, and the prompt is encoded in a thread of its own beside the capture; the conditioning's
  buffer is filled before the first replay (a process's first recipe only).

cProfile (``--profile``) sees every thread on Python 3.12, and a function's time includes its waits for the GIL:
read it for where threads contend, not as a split of the critical path.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench as B  # noqa: E402

import prkit.fast as fastmod  # noqa: E402
import prkit.fast_step as fast_step  # noqa: E402
import prkit.fast_warmup as fast_warmup  # noqa: E402
import prkit.train_inputs as train_inputs  # noqa: E402

T0 = time.perf_counter()
EVENTS: list = []


def event(name: str) -> None:
    EVENTS.append((round(time.perf_counter() - T0, 4), threading.current_thread().name, name))


def probe(owner, attr: str, label: str, sync: bool = False):
    """Record ``label>`` and ``label<`` around ``owner.attr`` (synced on the thread's stream first with ``sync``)."""
    real = getattr(owner, attr)

    def timed(*args, **kwargs):
        event(label + ">")
        out = real(*args, **kwargs)
        if sync and torch.cuda.is_available():
            torch.cuda.current_stream().synchronize()
        event(label + "<")
        return out
    setattr(owner, attr, timed)


def install_probes(cuda: bool) -> None:
    probe(train_inputs, "encode_images", "latents", sync=True)
    probe(train_inputs, "encode_text", "prompt", sync=True)
    probe(train_inputs._Cache, "__init__", "cache")
    probe(fastmod, "train_fast", "train_fast")
    probe(fast_step.TrainStep, "capture", "capture")
    probe(torch.cuda.CUDAGraph, "capture_end", "instantiate")
    probe(torch.Tensor, "backward", "backward")
    probe(fast_warmup, "warm_up_while_encoding", "warm")
    probe(fast_warmup, "plan_ahead", "plan", sync=True)
    real_call = fast_step.TrainStep.__call__

    def call(self):
        first = self.calls == 0
        if first:
            event("first_call>")
        out = real_call(self)
        if first:
            if cuda:
                torch.cuda.synchronize()
            event("first_call<")
        return out
    fast_step.TrainStep.__call__ = call


def capture_beside_the_latents() -> None:
    def warm_up(stepper, caches, triton_ready, warm_key):
        if triton_ready is not None:
            triton_ready.join()
        stepper.prepare()  # no wait for the latents first
        for cache in caches:
            cache.encode_latents()
        fast_warmup._WARMED.add(warm_key)
    fast_warmup.warm_up_while_encoding = warm_up


def prompt_in_its_own_thread(first_only: dict) -> None:
    """The prompt is encoded in a thread of its own; the UNet's conditioning buffer (a copy of the expanded
    prompt) is made from a zero stand-in and filled before the first call of the step."""
    pool = ThreadPoolExecutor(1, thread_name_prefix="prompt")
    pending, fills = [], []
    encode = train_inputs.encode_text
    contiguous = fastmod._contiguous
    call = fast_step.TrainStep.__call__

    def encode_text(pipe, prompt, size, grad=False):
        if not first_only["on"]:
            return encode(pipe, prompt, size, grad)
        te = pipe.text_encoder
        stand_in = torch.zeros((1, pipe.tokenizer.model_max_length, te.config.hidden_size), dtype=te.dtype,
                               device=pipe.unet.device)
        pending.append((pool.submit(lambda: encode(pipe, prompt, size, grad)["encoder_hidden_states"]), stand_in))
        return {"encoder_hidden_states": stand_in}

    def made_contiguous(cond):
        out = contiguous(cond)
        for _, stand_in in pending:
            if cond.get("encoder_hidden_states") is not None and \
                    cond["encoder_hidden_states"].data_ptr() == stand_in.data_ptr():
                fills.append((out["encoder_hidden_states"], stand_in))
        return out

    def filled_first(self):
        if pending:
            event("prompt_wait>")
            for future, stand_in in pending:
                real = future.result()
                stand_in.copy_(real)
                for buffer, source in fills:
                    if source is stand_in:
                        buffer.copy_(real.expand(buffer.shape))
            pending.clear()
            fills.clear()
            event("prompt_wait<")
        return call(self)

    train_inputs.encode_text = encode_text
    fastmod._contiguous = made_contiguous
    fast_step.TrainStep.__call__ = filled_first


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="out/timeline")
    parser.add_argument("--tag", default="")
    parser.add_argument("--variant", choices=["now", "beside", "textbg"], default="now")
    parser.add_argument("--profile", action="store_true", help="cProfile each recipe (slows it; see the docstring)")
    parser.add_argument("--tiny", action="store_true", help="tiny models on the CPU (a smoke test of this script)")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.tiny
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    first_only = {"on": True}
    if args.variant in ("beside", "textbg"):
        capture_beside_the_latents()
    if args.variant == "textbg":
        prompt_in_its_own_thread(first_only)
    install_probes(cuda)
    bench = B.Bench(argparse.Namespace(tiny=not cuda, out=str(out), budget=600, tag=args.tag, steps=150))
    event("build>")
    pipe, concept = B.build(bench, "sd15")
    if cuda:
        torch.cuda.synchronize()
    event("build<")
    pipe.unet.register_forward_pre_hook(lambda *_: event("unet_forward>"))
    pipe.unet.register_forward_hook(lambda *_: event("unet_forward<"))
    results = {}
    for name in ("first", "later"):
        first_only["on"] = name == "first"
        event(f"recipe_{name}>")
        profile = cProfile.Profile() if args.profile else None
        if profile:
            profile.enable()
        r = B._public(B.recipe(bench, pipe, concept, steps=150 if cuda else 4, batch=4, fast=True, name=name))
        if profile:
            profile.disable()
            for key in ("tottime", "cumulative"):
                text = io.StringIO()
                pstats.Stats(profile, stream=text).sort_stats(key).print_stats(70)
                (out / f"profile_{args.variant}_{args.tag}_{name}_{key}.txt").write_text(text.getvalue())
        event(f"recipe_{name}<")
        results[name] = {k: r.get(k) for k in ("seconds", "loss_first", "loss_last", "graph", "peak_alloc_GB",
                                               "peak_reserved_GB", "fast_log")}
        print(args.variant, args.tag, name, json.dumps(results[name]), flush=True)
    path = out / f"timeline_{args.variant}_{args.tag}.json"
    path.write_text(json.dumps({"variant": args.variant, "tag": args.tag, "env": bench.results["env"],
                                "results": results, "events": EVENTS}, indent=0))
    print(f"wrote {path}", flush=True)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
