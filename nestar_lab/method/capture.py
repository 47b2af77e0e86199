"""Captured patch solves: one fixed-step solve of one patch, replayed as one CUDA graph.

A patch solve at paper size is hundreds of small kernels (every solver step and stage runs
the velocity head, with batched guidance), launched op by op from Python: on a GPU the launches,
not the arithmetic, set the time (``docs/benchmarks.md``, "Paper size"). A fixed-step solver
issues the same kernels on every call, so the whole solve can be recorded once per shape and
replayed (gpt-fast, vLLM and SGLang do the same for a decoder step):

- inputs enter through static buffers (``copy_``): the conditioning, the noise (drawn by the
  caller, outside the graph, with its own generator) and the guidance scale (a device tensor,
  so a guidance schedule changes no graph);
- the graph is keyed by everything that fixes its kernels: the velocity function, the solver and
  its params, the shapes and dtypes, the precision; one graph per key, kept on the module that
  owns the velocity function, reused across calls;
- every solve graph of a device shares one memory pool (they never run concurrently; each result
  is copied out before the next replay), so the solve graphs hold about one solve's activations;
  the context graphs of a stage (:class:`StaticContext`) have a pool of their own, because their
  KV cache lives across other graphs' replays and must not share memory with their scratch.

Off CUDA (and under ``capture=False`` in tests) the same static-buffer function runs eagerly:
the CPU checks that it equals eager sampling and that it traces with no graph break.
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from typing import Callable, Literal

import torch
from torch import Tensor

from nestar_lab.interfaces import ODESolver, SolveResult, VelocityFn

CaptureMode = Literal["auto", "on", "off"]

_STORE_ATTR = "_nestar_static_solves"  # on the owner of a head: {key: StaticSolve}
_OWNERS: weakref.WeakSet = weakref.WeakSet()  # every owner holding one (weakly: a dropped model frees its graphs)
_POOLS: dict[str, object] = {}  # device -> the CUDA graph memory pool its captures share


class CaptureError(RuntimeError):
    """Capture was asked for where it cannot work, or failed (one line, says what to do)."""

    exit_code = 1


def why_not_capturable(solver: ODESolver, device: torch.device | str) -> str | None:
    """Why a patch solve with ``solver`` on ``device`` cannot be captured, or ``None`` if it can."""
    if torch.device(device).type != "cuda":
        return f"capture needs CUDA graphs and this run is on {torch.device(device).type}"
    if solver.evaluations() is None:
        return f"solver {type(solver).__name__} decides its steps on the host (adaptive), so no graph fixes its work"
    return None


def resolve(mode: CaptureMode | bool, solver: ODESolver, device: torch.device | str) -> bool:
    """Whether to solve through static buffers: ``auto`` where capturable, ``on`` always (an
    impossible ``on`` is a :class:`CaptureError`; configs refuse it earlier), ``off`` never. A
    bool is a decision already made (``True`` on the CPU runs the static path without a graph)."""
    if isinstance(mode, bool):
        return mode
    if mode == "off":
        return False
    reason = why_not_capturable(solver, device)
    if mode == "on" and reason is not None:
        raise CaptureError(f"sample.capture: on is impossible here: {reason}; set sample.capture: auto or off")
    return reason is None


def describe(mode: CaptureMode, solvers: list[ODESolver], device: torch.device | str) -> str:
    """One line for the log: which path sampling takes, and why."""
    if mode == "off":
        return "sampling: eager (sample.capture: off)"
    reasons = {why_not_capturable(s, device) for s in solvers} - {None}
    if not reasons:
        return "sampling: captured (one CUDA graph per patch shape, replayed)"
    return f"sampling: eager ({'; '.join(sorted(reasons))})"


def uncached(autocast: Callable) -> Callable:
    """``autocast`` with its weight-cast cache off: a graph must not keep casts that the cache
    frees when its context exits (``torch.cuda.make_graphed_callables`` states the rule)."""
    if isinstance(autocast, functools.partial) and autocast.func is torch.autocast:
        return functools.partial(autocast, cache_enabled=False)
    return autocast


class StaticSolve:
    """One patch solve over static buffers; on CUDA recorded once as a graph and replayed.

    ``head(y, t, cond)`` is the velocity network; ``make_velocity(head, cond, scale)`` turns it
    into the guided field ``(t, y) -> v`` (``flow.guided_velocity``). Call with the current
    conditioning, noise and guidance scale: they are copied into the buffers, the solve runs
    (or replays) and its end point is returned as a fresh tensor.
    """

    def __init__(self, solver: ODESolver, head: Callable, make_velocity: Callable, cond: Tensor, x0: Tensor,
                 autocast: Callable = contextlib.nullcontext, graph: bool | None = None):  # fmt: skip
        self.cond, self.x0 = cond.clone(), x0.clone()
        self.scale = torch.ones((), device=x0.device)  # guidance lives on the device: no graph per value
        self.solver = solver
        self.nfe = solver.evaluations()
        if self.nfe is None:
            raise CaptureError(f"solver {type(solver).__name__} is adaptive: its solve cannot be made static")
        autocast = uncached(autocast)

        def run(y: Tensor, t: Tensor, c: Tensor) -> Tensor:
            with autocast():
                return head(y, t, c)

        self.velocity: VelocityFn = make_velocity(run, self.cond, self.scale)
        self.graph = None
        self.out: Tensor | None = None
        self.memory_bytes = 0
        if graph if graph is not None else x0.device.type == "cuda":
            self._capture()

    def solve(self) -> Tensor:
        """The solve over the buffers as they are (what the graph records; traceable as one graph)."""
        return self.solver.solve(self.velocity, self.x0)

    def _capture(self) -> None:
        device = self.x0.device
        pool = _POOLS.setdefault(str(device), torch.cuda.graph_pool_handle())
        before = torch.cuda.memory_allocated(device)
        try:
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):  # warm-up off the capture: lazy kernels and workspaces
                for _ in range(2):
                    self.solve()
            torch.cuda.current_stream(device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.out = self.solve()
        except torch.OutOfMemoryError as exc:
            raise CaptureError(
                f"out of GPU memory capturing a patch solve for batch {self.x0.shape[0]} "
                f"(patch of {self.x0.shape[1]} tokens); lower sample.batch_size or set sample.capture: off"
            ) from exc
        self.graph = graph
        self.memory_bytes = max(torch.cuda.memory_allocated(device) - before, 0)

    def __call__(self, cond: Tensor, x0: Tensor, cfg_scale: float | Tensor) -> SolveResult:
        self.cond.copy_(cond)
        self.x0.copy_(x0)
        if isinstance(cfg_scale, Tensor):
            self.scale.copy_(cfg_scale)
        else:
            self.scale.fill_(cfg_scale)
        if self.graph is None:
            return SolveResult(self.solve(), self.nfe)
        self.graph.replay()
        return SolveResult(self.out.clone(), self.nfe)


class StaticContext:
    """The context passes of one stage at one shape (a scale module's ``start_cache`` and each
    step's ``extend``), on CUDA recorded as graphs over a KV cache they allocate once.

    The prefix graph allocates the cache (inside the shared pool, kept alive here); each step's
    graph appends at its fixed offset and reads everything before it, so replays in step order
    rebuild the cache of any labels. The first call at a shape runs eagerly (it warms up every
    kernel the graphs will record); the second records the graphs, replaying each at once; later
    calls only replay. Each step's ``rows`` are kept with its graph (the graph reads their
    memory). Off CUDA every call is eager.
    """

    def __init__(self, net, stage: int, capacity: int, autocast: Callable, graphs: bool | None = None):
        self.net, self.stage, self.capacity = net, stage, capacity
        self.autocast = uncached(autocast)
        on_cuda = torch.cuda.is_available() and next(net.parameters()).device.type == "cuda"
        self.graphs = on_cuda if graphs is None else graphs and on_cuda
        self.calls = 0
        self.labels: Tensor | None = None
        self.prefix = None
        self.cache = None
        self.steps: dict[int, tuple[Tensor, object, Tensor, object]] = {}  # step -> (input, graph, output, rows)
        self.pool = None  # this stage's graphs replay in the order they were recorded, so they share one
        self.memory_bytes = 0

    def _record(self, fn: Callable[[], object]):
        device = next(self.net.parameters()).device
        if self.pool is None:  # its own pool: the cache must never share memory with another graph's
            self.pool = torch.cuda.graph_pool_handle()  # scratch (a solve replayed between two steps)
        pool = self.pool
        before = torch.cuda.memory_allocated(device)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=pool), self.autocast():
                out = fn()
        except torch.OutOfMemoryError as exc:
            raise CaptureError(f"out of GPU memory capturing a context pass of stage {self.stage + 1}; "
                               f"lower sample.batch_size or set sample.capture: off") from exc  # fmt: skip
        self.memory_bytes += max(torch.cuda.memory_allocated(device) - before, 0)
        graph.replay()
        return graph, out

    def start(self, labels: Tensor):
        """The cache holding the label prefix for ``labels`` (what ``net.start_cache`` returns)."""
        self.calls += 1
        if not self.graphs or self.calls == 1:
            with self.autocast():
                self.cache = self.net.start_cache(labels, stage=self.stage, capacity=self.capacity)
            return self.cache
        if self.prefix is None:
            self.labels = labels.clone()
            self.prefix, self.cache = self._record(
                lambda: self.net.start_cache(self.labels, stage=self.stage, capacity=self.capacity))
        else:
            self.labels.copy_(labels)
            self.prefix.replay()
        return self.cache

    def extend(self, step: int, x_in: Tensor, rows) -> Tensor:
        """Step ``step``'s conditioning (``net.extend`` on the cache :meth:`start` returned)."""
        if not self.graphs or self.calls == 1:
            with self.autocast():
                return self.net.extend(x_in, rows, self.cache)
        if step not in self.steps:
            buffer = x_in.clone()
            graph, out = self._record(lambda: self.net.extend(buffer, rows, self.cache))
            self.steps[step] = (buffer, graph, out, rows)
        else:
            buffer, graph, out, _ = self.steps[step]
            buffer.copy_(x_in)
            graph.replay()
        return out.clone()


def context_passes(net, stage: int, labels: Tensor, capacity: int, autocast: Callable, static: bool) -> StaticContext:
    """A stage's context passes: ``static``, the kept :class:`StaticContext` of ``net`` for this
    stage, batch and precision (recorded on CUDA); else a fresh eager one (a cache per call)."""
    if not static:
        return StaticContext(net, stage, capacity, autocast, graphs=False)
    store = vars(net).setdefault(_STORE_ATTR, {})
    _OWNERS.add(net)
    key = ("context", stage, tuple(labels.shape), capacity, _autocast_key(autocast))
    if key not in store:
        store[key] = StaticContext(net, stage, capacity, autocast)
    return store[key]


def _owner_and_func(head: Callable) -> tuple[object, object]:
    """What a capture is stored on (the module of a bound method, else the callable) and its key."""
    owner = getattr(head, "__self__", None)
    return (owner, head.__func__) if owner is not None else (head, None)


def static_solve(solver: ODESolver, head: Callable, make_velocity: Callable, cond: Tensor, x0: Tensor,
                 autocast: Callable, graph: bool | None = None) -> StaticSolve:  # fmt: skip
    """The :class:`StaticSolve` for this head, solver, shapes and precision, built on first use."""
    owner, func = _owner_and_func(head)
    store = vars(owner).setdefault(_STORE_ATTR, {})  # on the owner: its graphs live and die with it
    _OWNERS.add(owner)
    key = (func, type(solver), solver.params.model_dump_json(), tuple(cond.shape), cond.dtype, tuple(x0.shape),
           x0.dtype, str(x0.device), _autocast_key(autocast), graph)  # fmt: skip
    if key not in store:
        store[key] = StaticSolve(solver, head, make_velocity, cond, x0, autocast, graph)
    return store[key]


def _autocast_key(autocast: Callable) -> tuple:
    if isinstance(autocast, functools.partial):
        return (autocast.func, autocast.args, tuple(sorted(autocast.keywords.items())))
    return (autocast,)


def captured(owner: object) -> list[StaticSolve]:
    """The static solves kept for ``owner`` (a module whose head was solved with capture)."""
    return [s for s in vars(owner).get(_STORE_ATTR, {}).values() if isinstance(s, StaticSolve)]


def graph_memory_bytes() -> int:
    """GPU memory the captured graphs took when they were recorded (sum over every store)."""
    return sum(s.memory_bytes for owner in list(_OWNERS) for s in vars(owner).get(_STORE_ATTR, {}).values())


def clear() -> None:
    """Drop every capture (frees their graphs' memory once nothing else holds it)."""
    for owner in list(_OWNERS):
        vars(owner).pop(_STORE_ATTR, None)
    _OWNERS.clear()
    _POOLS.clear()
