"""Shared fixtures: tiny seeded UNets and pipelines, tiny concepts, and helpers for the core tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tiny import tiny_pipeline, tiny_tokenizer, tiny_unet

# The CI machines have few, shared cores: one thread is faster than two fighting ones for tiny models.
torch.set_num_threads(1)

ARCHS = {  # id -> tiny_unet kwargs
    "conv": dict(),  # SD1-style: 1x1 Conv2d proj_out
    "linear": dict(linear=True),  # SD2-style: Linear proj_out
    "sdxl": dict(linear=True, sdxl_like=True),  # Linear, a block with 2 transformer layers
}
TOKENS = 16  # tokenizer max length of the tiny components
TEXT_DIM = 32  # cross-attention dim of the tiny UNet


@pytest.fixture(scope="session", autouse=True)
def ctrl_c_as_in_a_terminal():
    """Ctrl-C raises KeyboardInterrupt in the tests, as in a terminal, also when pytest was started in the background
    by a non-interactive shell (or nohup), which starts it with SIGINT ignored."""
    import signal

    before = signal.getsignal(signal.SIGINT)
    if before == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    if before == signal.SIG_IGN:
        signal.signal(signal.SIGINT, before)


@pytest.fixture(params=list(ARCHS))
def arch(request) -> str:
    return request.param


@pytest.fixture
def unet(arch):
    return tiny_unet(**ARCHS[arch])


@pytest.fixture
def tokenizer(tmp_path_factory):
    return tiny_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture
def pipe(tmp_path):
    """A fresh SD1-style (conv proj_out) tiny StableDiffusionPipeline: 16x16 images, 8x8 latents."""
    return tiny_pipeline(tmp_path / "pipe")


def child_env(*first: str | Path, **variables: str) -> dict:
    """The environment of a child Python: this checkout (then ``first``) ahead on PYTHONPATH, the caller's own
    PYTHONPATH kept after them (a GPU machine carries diffusers there), plus ``variables``."""
    path = [str(Path(__file__).resolve().parents[1]), *map(str, first), os.environ.get("PYTHONPATH")]
    return {**os.environ, **variables, "PYTHONPATH": os.pathsep.join(filter(None, path))}


def make_pipe(folder, linear: bool = False):
    return tiny_pipeline(folder, linear=linear)


def load_lora_file(pipe, path, **kwargs) -> None:
    """``pipe.load_lora_weights`` on a LoRA file as the README and ``prkit export`` show it: its folder and
    ``weight_name`` (under HF_HUB_OFFLINE=1, diffusers < 0.40 refuses a bare file path and a folder without it)."""
    path = Path(path)
    pipe.load_lora_weights(str(path.parent), weight_name=path.name, **kwargs)


def unet_inputs(batch: int = 2, seed: int = 0, size: int = 8):
    """Seeded (sample (B, 4, s, s), timestep, encoder_hidden_states (B, 16, 32)) for a tiny UNet."""
    gen = torch.Generator().manual_seed(seed)
    sample = torch.randn(batch, 4, size, size, generator=gen)
    text = torch.randn(batch, TOKENS, TEXT_DIM, generator=gen)
    return sample, torch.tensor(500), text


@torch.no_grad()
def run_unet(unet, inputs) -> torch.Tensor:
    sample, t, text = inputs
    return unet(sample, t, encoder_hidden_states=text).sample


@torch.no_grad()
def randomize(residuals, seed: int = 1, std: float = 0.3) -> None:
    """Give a residual set non-zero, seeded factors (a trained-looking set)."""
    gen = torch.Generator().manual_seed(seed)
    for lowrank in residuals.factors().values():
        for p in (lowrank.down, lowrank.up):
            p.copy_(torch.randn(p.shape, generator=gen) * std)


def trainable_residuals(unet, seed: int = 0) -> list:
    """Seeded, non-zero rank-4 residuals on ``unet``; returns their factors (down, up per layer)."""
    import prkit

    res = prkit.add_residuals(unet, rank=4, seed=seed)
    randomize(res)
    return [p for lowrank in res.factors().values() for p in (lowrank.down, lowrank.up)]


def output_and_grads(unet, params: list, sample, timestep, text):
    """One forward + backward of mean(out^2): (output, gradients of ``params``)."""
    for p in params:
        p.requires_grad_(True)
        p.grad = None
    out = unet(sample, timestep, encoder_hidden_states=text).sample
    out.square().mean().backward()
    return out.detach(), [p.grad.clone() for p in params]


def make_concept(token: str = "sks", class_word: str = "dog", resolution: int = 16):
    """A prkit Concept of three 16x16 images (the tiny pipeline's resolution; others resized from them)."""
    from PIL import Image

    from prkit.data import Concept

    images = []
    for i in range(3):
        img = Image.new("RGB", (16, 16), (60 * i, 120, 200 - 50 * i))
        img.paste((250, 250 - 80 * i, 10), (4, 4, 12, 12))
        images.append(img if resolution == 16 else img.resize((resolution, resolution)))
    return Concept(images=images, token=token, class_word=class_word, paths=[])


@pytest.fixture
def concept():
    return make_concept()


def interrupt_backward(monkeypatch, at: int):
    """Make the eager loop's ``at``-th update raise KeyboardInterrupt before it happens; returns the real one."""
    import prkit.train as train

    real, calls = train._backward, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == at:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(train, "_backward", interrupted)
    return real


def interrupt_fast_step(monkeypatch, at: int):
    """Make the fast loop's ``at``-th step body raise KeyboardInterrupt before it runs; returns the real one."""
    from prkit.fast_step import TrainStep

    real, calls = TrainStep._body, []

    def interrupted(self):
        calls.append(1)
        if len(calls) == at:
            raise KeyboardInterrupt
        real(self)

    monkeypatch.setattr(TrainStep, "_body", interrupted)
    return real


def full_disk(monkeypatch, free_mib: int = 5, after: int = 64) -> None:
    """Make prkit's file writes (``prkit.atomic.writing``) fail as on a full disk: ``after`` bytes land, then
    ENOSPC; the disk reports ``free_mib`` MiB free."""
    import errno
    import io
    import shutil

    import prkit.atomic as atomic

    class Full(io.FileIO):
        def write(self, data):
            room = after - self.tell()
            if len(data) > room:
                super().write(bytes(data)[:max(room, 0)])  # half a file on disk, as a real full disk leaves
                raise OSError(errno.ENOSPC, "No space left on device")
            return super().write(data)

    monkeypatch.setattr(atomic, "open", lambda path, mode="r": Full(path, mode), raising=False)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(2 ** 40, 0, free_mib * 2 ** 20))


def blocks_from_two_threads(enter, first, second, look) -> tuple[bool, dict]:
    """Enter the block ``enter(first)`` here and ``enter(second)`` from another thread once the first is in; returns
    whether the second got in while the first was still in (within 0.5 s) and what ``look()`` saw inside each
    ({"first": ..., "second": ...}). The other thread must end, without an error."""
    import threading

    seen, errors = {}, []
    first_in, second_in = threading.Event(), threading.Event()

    def run_second():
        try:
            first_in.wait(timeout=60)
            with enter(second):
                second_in.set()
                seen["second"] = look()
        except Exception as err:  # noqa: BLE001 - shown in the assertion
            errors.append(err)

    thread = threading.Thread(target=run_second)
    thread.start()
    with enter(first):
        first_in.set()
        waited = second_in.wait(timeout=0.5)  # without the lock: the second block is in by now
        seen["first"] = look()
    thread.join(timeout=60)
    assert not thread.is_alive() and not errors, errors
    return waited, seen
