"""The fast loop's training step: AdamW as CUDA graphs want it (fused, capturable), the static buffers of each loss
term, ``TrainStep`` (forward + backward + optimizer step, captured once as a CUDA graph and replayed) and the
device snapshot the loop rolls back to. It runs the step it is handed on the buffers it is given: it must not
draw batches, sync with the host or decide when losses are checked (``fast.train_fast`` does).
"""

from __future__ import annotations

import logging
import time
import warnings

import torch
import torch.nn.functional as F

from .streams import side_stream

log = logging.getLogger(__name__)


def make_optimizer(params, learning_rate: float, weight_decay: float, device: torch.device):
    """AdamW as the eager loop uses it; on CUDA fused and graph-capturable (step counters on the device)."""
    extra = {"fused": True, "capturable": True} if device.type == "cuda" else {}
    return torch.optim.AdamW(params, lr=learning_rate, weight_decay=weight_decay, **extra)


def _make_capturable(optimizer, device: torch.device) -> None:
    """After loading an eager checkpoint: keep the groups fused/capturable and the step counters on the device."""
    if device.type != "cuda":
        return
    for group in optimizer.param_groups:
        group.update(fused=True, capturable=True, foreach=None)
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            if "step" in state:
                state["step"] = torch.as_tensor(state["step"], dtype=torch.float32).to(p.device)


def clip_and_norm(params, max_grad_norm: float | None, want: bool = True) -> torch.Tensor | None:
    """Clip ``params``' gradients to ``max_grad_norm`` (falsy: no clipping) and return their total 2-norm before
    clipping, a device scalar that is NaN or infinite where a gradient is; None where nothing clips and ``want`` is
    off, or there are no gradients. Both loops refuse a step whose norm is not finite unless a grad scaler skips it."""
    if max_grad_norm:
        return torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    grads = [p.grad for p in params if p.grad is not None]
    if not want or not grads:
        return None
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)).float())


@torch.no_grad()
def init_optimizer_state(optimizer, params) -> bool:
    """Create ``optimizer``'s state for the parameters that have none, as its first step would, and leave it at its
    start (all zeros: AdamW's step count and moments). A graph captured before any eager step must not hold the
    state's creation, or every replay would zero the moments again. Returns whether the state is there (False: an
    optimizer path this does not know to leave the parameters alone; nothing is done then).

    The optimizer makes it itself, in one step with learning rate 0 on zero gradients: AdamW then leaves finite
    parameters as they are (its decay subtracts 0 * wd * p, its update adds 0; fused, foreach and for-loop paths,
    capturable or not, except the capturable for-loop one, whose 0 / 0 would make them NaN), so nothing is copied (a
    whole UNet for DreamBooth's target). The step and the zeroing happen together (an interrupt waits): a stepped
    state would be kept by the checkpoint the interrupt writes. The parameters' gradients and any existing state (a
    resumed run's) are kept."""
    from .interrupts import deferred_interrupt

    params = list(params)
    fresh = {id(p) for p in params if not optimizer.state.get(p)}
    if not fresh:
        return True
    if any(g.get("capturable") and not g.get("fused") and not g.get("foreach") or g.get("differentiable")
           for g in optimizer.param_groups):  # (foreach None may resolve to the for-loop path)
        return False
    grads = [p.grad for p in params]
    rates = [group["lr"] for group in optimizer.param_groups]
    with deferred_interrupt():
        try:
            for p in params:
                p.grad = torch.zeros_like(p) if id(p) in fresh else None
            for group in optimizer.param_groups:
                group["lr"] = torch.zeros_like(group["lr"]) if torch.is_tensor(group["lr"]) else 0.0
            # this step runs outside a capture on purpose: no "capturable=True ... without CUDA graph capture" warning
            optimizer._warned_capturable_if_run_uncaptured = True
            optimizer.step()
            for p in params:
                if id(p) in fresh:
                    for tensor in optimizer.state[p].values():
                        if torch.is_tensor(tensor):
                            tensor.zero_()
        finally:
            for group, rate in zip(optimizer.param_groups, rates):
                group["lr"] = rate
            for p, grad in zip(params, grads):
                p.grad = grad
    return True


@torch.no_grad()
def match_state_layouts(optimizer_state, params) -> None:
    """Give each parameter's optimizer moments (AdamW's exp_avg, exp_avg_sq) the parameter's shape and strides.

    A checkpoint's moments keep the layout of the loop that wrote them: the fast loop's are channels-last (its UNet
    runs so), the eager loop's contiguous, and a flattened view has the parameter's elements in another shape. Fused
    AdamW reads a moment as laid out like its parameter: on CUDA it refuses another layout, on the CPU it silently
    pairs the wrong elements. Call it once the parameters have the layout they train in (after loading a state, and
    again after a patch changes their memory format); a moment already laid out like its parameter is kept as is.
    """
    for p in params:
        for key, value in optimizer_state.get(p, {}).items():
            if (key == "step" or not torch.is_tensor(value) or value.dim() == 0 or value.numel() != p.numel()
                    or (value.shape == p.shape and value.stride() == p.stride())):
                continue
            moment = torch.empty_like(p, dtype=value.dtype)  # the parameter's strides (dense parameters)
            moment.copy_(value.reshape(p.shape))
            optimizer_state[p][key] = moment


class _Slot:
    """Static device buffers of one loss term: noisy latents, timesteps, target; its conditioning and weight."""

    def __init__(self, shape, cond: dict, weight: float, dtype, device, channels_last: bool):
        fmt = torch.channels_last if channels_last and len(shape) == 4 else torch.contiguous_format
        self.noisy = torch.empty(shape, dtype=dtype, device=device).contiguous(memory_format=fmt)
        self.timesteps = torch.empty(shape[0], dtype=torch.long, device=device)
        self.target = torch.empty(shape, dtype=torch.float32, device=device).contiguous(memory_format=fmt)
        self.cond = cond
        self.weight = weight


class TrainStep:
    """One training step on static buffers: forward, loss, backward, (unscale,) clip, AdamW, (scale update).

    On CUDA the step is captured as a CUDA graph before any eager step (``capture_first``: ``capture`` creates
    AdamW's state first; the capture itself pays the process's one-time kernel costs) and every call replays it.
    Where that capture fails, or without ``capture_first``, the first call runs eagerly and the step is captured
    after it; where that capture fails too, steps stay eager.
    ``loss`` is a device scalar holding the last step's (unscaled) loss; nothing here syncs with the host.
    """

    def __init__(self, unet, params, optimizer, slots: list[_Slot], *, amp: torch.dtype | None,
                 scaler=None, max_grad_norm: float | None = None, cuda_graph: bool = True, capture_first: bool = True):
        self.unet, self.params, self.optimizer, self.slots = unet, list(params), optimizer, slots
        self.device = slots[0].noisy.device
        # autocast only where the weights are not already in the compute dtype
        self.autocast = amp if amp is not None and unet.dtype != amp else None
        self.scaler = scaler
        self.max_grad_norm = max_grad_norm
        self.want_graph = cuda_graph and self.device.type == "cuda"
        self.capture_first = capture_first and self.want_graph  # not tried yet
        self.graph = None
        self.capture_error: str | None = None
        self.first_capture_error: str | None = None  # why capturing before any eager step failed, if it did
        self.loss = torch.zeros((), dtype=torch.float32, device=self.device)
        # without a grad scaler (which skips such steps itself), the gradients' norm: a non-finite one with a finite
        # loss would leave NaN weights; the loop reads it with the loss and refuses the step (as the eager loop does)
        self.grad_norm = torch.zeros((), dtype=torch.float32, device=self.device) if scaler is None else None
        self.found_inf = None
        if scaler is not None:
            scaler._lazy_init_scale_growth_tracker(self.device)
            self.found_inf = torch.zeros((), dtype=torch.float32, device=self.device)
            optimizer.found_inf = self.found_inf  # read by fused AdamW: skips the update on inf/nan grads
        self.calls = 0
        self.capture_seconds = 0.0

    def load(self, batches) -> None:
        """Copy one step's (noisy, timesteps, target) per slot into the static buffers (async)."""
        for slot, (noisy, steps, target) in zip(self.slots, batches):
            slot.noisy.copy_(noisy, non_blocking=True)
            slot.timesteps.copy_(steps, non_blocking=True)
            slot.target.copy_(target, non_blocking=True)

    def _body(self) -> None:
        total = None
        device_type = self.device.type
        for slot in self.slots:
            with torch.autocast(device_type, dtype=self.autocast or torch.bfloat16, enabled=self.autocast is not None,
                                cache_enabled=False):
                pred = self.unet(slot.noisy, slot.timesteps, **slot.cond).sample
            loss = F.mse_loss(pred.float(), slot.target)
            total = loss if total is None else total + slot.weight * loss
        if self.scaler is not None:
            scale = self.scaler._scale
            (total * scale).backward()
            grads = [p.grad for p in self.params if p.grad is not None]
            self.found_inf.zero_()
            torch._amp_foreach_non_finite_check_and_unscale_(grads, self.found_inf, scale.double().reciprocal().float())
        else:
            total.backward()
        norm = clip_and_norm(self.params, self.max_grad_norm, want=self.grad_norm is not None)
        if self.grad_norm is not None and norm is not None:
            self.grad_norm.copy_(norm)
        self.optimizer.step()
        if self.scaler is not None:
            s = self.scaler
            torch._amp_update_scale_(s._scale, s._growth_tracker, self.found_inf, s._growth_factor,
                                     s._backoff_factor, s._growth_interval)
        self.loss.copy_(total.detach())

    def warm_up(self) -> None:
        """A throwaway forward + backward on the first slot's buffers (zeroed first), before any real step.

        It pays the process's one-time cost of every kernel the step launches (cuDNN plans and attention
        compiles, Triton kernel loads, lazily loaded CUDA modules) while the caller's other work runs in another
        thread; call it from the thread that runs the steps (PyTorch caches cuDNN plans per thread). Parameters,
        their gradients and the optimizer are untouched.
        """
        slot = self.slots[0]
        for buffer in (slot.noisy, slot.timesteps, slot.target):
            buffer.zero_()
        with torch.autocast(self.device.type, dtype=self.autocast or torch.bfloat16,
                            enabled=self.autocast is not None, cache_enabled=False):
            pred = self.unet(slot.noisy, slot.timesteps, **slot.cond).sample
        loss = F.mse_loss(pred.float(), slot.target)
        torch.autograd.grad(loss, self.params, allow_unused=True)

    def prepare(self) -> None:
        """Before the first step, in the thread that runs the steps: capture the step now (``capture_first``), or
        else (or where that capture fails) ``warm_up``. Either pays the process's one-time kernel costs."""
        if not (self.capture_first and self.capture()):
            self.warm_up()

    def capture(self) -> bool:
        """Capture the step as a CUDA graph before any eager step (AdamW's state created first); returns whether a
        graph is ready. The capture pays the one-time costs of every kernel it records (cuDNN plans and attention
        graphs, Triton and CUDA module loads); it runs in relaxed mode, so those set-up calls are allowed. No other
        thread may allocate on the GPU meanwhile (an out-of-memory retry there would empty the allocator's cache
        mid-capture): the fast loop waits for its latents first. Tried once: where it fails, the first call runs
        eagerly and captures after it (a failed capture's memory pool stays reserved: a key that failed is not tried
        again in the process)."""
        self.capture_first = False
        if not init_optimizer_state(self.optimizer, self.params):
            self.first_capture_error = "the optimizer's state cannot be made ahead (an AdamW path it does not know)"
            return False
        current = torch.cuda.current_stream(self.device)
        side_stream(self.device).wait_stream(current)
        self._capture("relaxed")
        if self.graph is None:
            self.first_capture_error, self.capture_error = self.capture_error, None
            self.want_graph = True
            log.warning("capturing the training step before an eager step failed (%s); one eager step first, then "
                        "the capture", self.first_capture_error)
        return self.graph is not None

    def __call__(self) -> torch.Tensor:
        self.calls += 1
        if self.capture_first:
            self.capture()
        if self.graph is not None:
            self.graph.replay()
            return self.loss
        self.optimizer.zero_grad(set_to_none=True)
        if not self.want_graph:
            self._body()
            return self.loss
        current = torch.cuda.current_stream(self.device)
        side = side_stream(self.device)
        side.wait_stream(current)
        # the caching allocator keeps blocks per stream: what the warm-up and the latents' encoding left cached on
        # this stream could not serve the side stream's step, and both would count in the card's footprint
        torch.cuda.empty_cache()
        with torch.cuda.stream(side):  # this first eager step is a real step, run on a side stream as capture wants
            self._body()
        current.wait_stream(side)
        self._capture()
        return self.loss

    def _capture(self, error_mode: str = "global") -> None:
        start = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        # memory cached by earlier work of the process (earlier runs' graph pools included) cannot be freed while
        # a capture runs, so an allocation could fail there (seen: SDXL, 58 GB cached, capture OOM): free it first
        torch.cuda.empty_cache()
        # a pool of its own: a capture that failed mid-way leaves its pool reserved and marked as being recorded to,
        # so a capture into that pool again fails ("already recording to mempool_id"; one H200, torch 2.11)
        graph = torch.cuda.CUDAGraph()
        before = torch.cuda.current_stream(self.device)
        try:
            # the UNet's device, not the current
            with torch.cuda.graph(graph, stream=side_stream(self.device), capture_error_mode=error_mode):
                self._body()
        except Exception as err:  # noqa: BLE001 - any capture failure falls back to eager steps
            # torch.cuda.graph's exit ends the capture before it gives the stream back: where ending it fails, the
            # side stream stayed this thread's current one (for the rest of the run and after it)
            torch.cuda.set_stream(before)
            self.want_graph = False
            self.capture_error = _capture_cause(err)
            self.optimizer.zero_grad(set_to_none=True)
            if error_mode == "global":  # the capture before any eager step tries again after one
                warnings.warn(f"CUDA graph capture of the training step failed ({self.capture_error}); "
                              "continuing with eager steps", RuntimeWarning, stacklevel=3)
            return
        finally:
            self.capture_seconds += time.perf_counter() - start
        self.graph = graph

    def close(self) -> None:
        """Free the graph and its memory pool; detach the fp16 hooks from the optimizer."""
        self.graph = None
        if self.found_inf is not None and getattr(self.optimizer, "found_inf", None) is self.found_inf:
            del self.optimizer.found_inf
        self.optimizer.zero_grad(set_to_none=True)


def _capture_cause(err: BaseException) -> str:
    """What made a capture fail, in one line: CUDA reports a failed operation inside a capture again when the
    capture ends ("operation failed due to a previous error during capture"), and that error replaces the first."""
    if err.__context__ is not None and "previous error during capture" in str(err):
        err = err.__context__
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0] if lines else ''}"


class _Snapshot:
    """Copies of the trainable state (parameters, AdamW moments and steps, loss scale) for rollback: on the device
    for a residual set (a few MB), in host memory past ``HOST_FROM`` bytes (a whole UNet's weights and moments,
    ~10 GB for SD1.5's DreamBooth target, would not fit beside the run on a 24 GB card)."""

    HOST_FROM = 1 << 30

    def __init__(self, params, optimizer, scaler):
        self.params, self.optimizer, self.scaler = list(params), optimizer, scaler
        self.saved: list[tuple[torch.Tensor, torch.Tensor]] = []

    def _tensors(self) -> list[torch.Tensor]:
        out = list(self.params)
        for p in self.params:
            out.extend(v for v in self.optimizer.state.get(p, {}).values() if torch.is_tensor(v))
        if self.scaler is not None and self.scaler._scale is not None:
            out.extend([self.scaler._scale, self.scaler._growth_tracker])
        return out

    @torch.no_grad()
    def take(self) -> None:
        tensors = self._tensors()
        host = sum(t.numel() * t.element_size() for t in tensors) >= self.HOST_FROM
        if not host:
            self.saved = [(t, t.detach().clone()) for t in tensors]
            return
        buffers = {id(t): copy for t, copy in self.saved}  # each tensor's buffer, kept: only new state gets one
        kept = [buffers.get(id(t)) for t in tensors]
        self.saved = [(t, copy if copy is not None else self._host_buffer(t)) for t, copy in zip(tensors, kept)]
        for tensor, copy in self.saved:  # enqueued on the step's stream, so read back (restore) only after the
            copy.copy_(tensor, non_blocking=copy.is_pinned())  # window's sync

    @staticmethod
    def _host_buffer(t: torch.Tensor) -> torch.Tensor:
        """Pinned host memory for ``t`` (asynchronous copies), pageable where pinning fails (a host short of it)."""
        if t.is_cuda:
            try:
                return torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            except RuntimeError:
                pass
        return torch.empty(t.shape, dtype=t.dtype)

    @torch.no_grad()
    def restore(self) -> None:
        kept = {id(t) for t, _ in self.saved}
        for tensor, copy in self.saved:
            tensor.copy_(copy)
        for tensor in self._tensors():  # state created after the snapshot (AdamW's, at the first step): fresh
            if id(tensor) not in kept:
                tensor.zero_()
