"""The ranks of one data-parallel run under ``torchrun``, seen from one of them.

``torchrun --nproc_per_node=N -m moe_cl.run ...`` starts N processes (ranks) of one run
(:mod:`moe_cl.run.torchrun` drives it; docs/scaling.md has the user's view). This module is
how they talk:

- the process group comes from torchrun's environment: gloo for the ranks' agreements (objects,
  random states, flags), plus NCCL for tensors on GPUs; a rank's GPU is its LOCAL_RANK (not its
  global rank, as Avalanche's ``make_device`` takes);
- rank 0 alone owns the run folder: it claims it, writes config.yaml, checkpoints, results.json,
  logs and figures, and hands its settings and checkpoint to the others; they write nothing and
  have no loggers;
- every rank holds the whole data and the same random state, so all draw the same stream,
  permutation and augmentation; each global batch (``train.batch_size``) is split into
  contiguous shards, one per rank (``MoEStrategy(ranks=...)`` on the fast data path);
- no DDP wrapper: growth adds parameters after every experience, and Avalanche and our
  checkpoints name parameters without a ``module.`` prefix. ``plugins.DataParallel`` instead sums
  the gradients of all ranks after each backward pass in one flat all-reduce, each rank's loss
  weighted by its share of the batch, which is the gradient of the whole batch's loss; the
  routing regularisers see the whole batch through :meth:`Ranks.gather_rows` (with gradients);
  BatchNorm becomes SyncBatchNorm on GPUs;
- growth decisions are computed on every rank from the same state; the ranks compare their
  models' structure after each adaptation, and rank 0's parameters and buffers are broadcast at
  the start of each experience (buffers again at each epoch's end and after each experience, so
  a router's statistics and BatchNorm statistics are rank 0's);
- every rank evaluates the whole test stream (the same weights give the same numbers; no metric
  needs reducing), and the training epoch's accuracy, loss and reference train error are summed
  over the ranks;
- a NaN loss on one rank stops every rank in the same step (exit 3): it travels with the
  gradients. Any other error on one rank is posted to torchrun's key-value store, where a
  watcher thread on every rank sees it within a second and ends its process (rank 0 releases
  the run folder first; the others wait for rank 0): no rank waits for a collective's timeout.
  A SIGTERM (torchrun's, once a rank has ended; a scheduler's) reaches the watcher too.
"""

from __future__ import annotations

import atexit
import os
import select
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

from moe_cl.errors import AgreedFailure, ConfigError, exit_code

T = TypeVar("T")

WATCH_INTERVAL_S = 0.5  # how often each rank looks for another rank's failure
MAIN_DONE_WAIT_S = 60.0  # how long the other ranks give rank 0 to leave the run folder in order
LINGER_S = 10.0  # then how long they give its process to end first (torchrun's SIGTERM is sooner)
FAILURE, MAIN_DONE = "failure", "main_done"
# How long a rank may wait for the others in an agreement, e.g. for rank 0 to download a data
# set (failures do not wait for it: the watcher ends every rank at once).
AGREEMENT_TIMEOUT = timedelta(hours=1)


def start_process_group(rank: int, world_size: int) -> None:
    """The gloo process group of torchrun's ranks (agreements may wait an hour)."""
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=AGREEMENT_TIMEOUT)


def one_line(error: BaseException) -> str:
    """An error as one line: its message, with its type where it is a bug."""
    text = " ".join(str(error).split())
    return text if exit_code(error) is not None else f"{type(error).__name__}: {text}"


def _nothing() -> None:
    return None


class Ranks:
    """The processes of one data-parallel run, seen from one of them.

    Agreements (:meth:`together`, :meth:`share`, :meth:`main_first`, :meth:`from_main`) run on
    the gloo group; tensors of the model on ``group`` (NCCL on GPUs, gloo on CPUs), chosen with
    the device by :meth:`take_device`.
    """

    def __init__(self, *, rank: int, world_size: int, local_rank: int) -> None:
        self.rank, self.world_size, self.local_rank = rank, world_size, local_rank
        self.device = torch.device("cpu")
        self.group: dist.ProcessGroup | None = None  # None: the default (gloo) group
        self._abort_cleanups: list[Callable[[], None]] = []
        self._stopping = False  # this rank is ending (its failure, or done): ignore the others
        self._exit_code: int | None = None  # the failure this rank ends with, once known
        self._store_lock = threading.Lock()
        env = os.environ
        self._store = dist.PrefixStore(
            f"moe_cl/{env.get('TORCHELASTIC_RUN_ID', '')}/"
            f"{env.get('TORCHELASTIC_RESTART_COUNT', '0')}/",
            dist.TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), is_master=False,
                          wait_for_workers=False, timeout=timedelta(seconds=30)))
        if self.is_main:
            atexit.register(self._post, MAIN_DONE, "")  # after a traceback is printed, too
        self._watch_for_failures()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # -- devices

    def take_device(self, setting: str) -> None:
        """``cuda:LOCAL_RANK`` or ``cpu`` for ``device=setting``; a rank without its GPU, or
        ranks that would end up on different kinds of device, are a usage error on every
        rank."""
        kind = self.together(lambda: _device_kind(setting, self.local_rank))
        kinds = self.gather(kind)
        if len(set(kinds)) > 1:
            on = "; ".join(f"{k} on ranks {[r for r, x in enumerate(kinds) if x == k]}"
                           for k in sorted(set(kinds)))
            raise AgreedFailure(f"device={setting} gives different devices ({on}); set "
                                "device=cuda or device=cpu", 2)
        if kind == "cuda":
            torch.cuda.set_device(self.local_rank)
            self.device = torch.device("cuda", self.local_rank)
            self.group = dist.new_group(backend="nccl")

    # -- agreements (gloo)

    def together(self, work: Callable[[], T]) -> T:
        """``work()`` on every rank; if it fails on any, every rank raises: the failed ranks
        their own error, the others an :class:`AgreedFailure` naming the first failed rank."""
        failure = own = value = None
        try:
            value = work()
        except Exception as error:  # noqa: BLE001 - shared with the other ranks, then raised
            own, failure = error, (exit_code(error) or 1, one_line(error))
        failures = self.gather(failure)
        failed = [(rank, f) for rank, f in enumerate(failures) if f is not None]
        if not failed:
            return value
        if own is not None:
            own.every_rank = True
            raise own
        rank, (code, message) = failed[0]
        raise AgreedFailure(f"rank {rank}: {message}", code)

    def main_first(self, work: Callable[[], T]) -> T:
        """``work()`` on rank 0, then (if it succeeded) on the others."""
        first = self.together(work if self.is_main else _nothing)
        rest = self.together(_nothing if self.is_main else work)
        return first if self.is_main else rest

    def from_main(self, work: Callable[[], T]) -> T:
        """``work()`` on rank 0 (reading the run folder), its value on every rank."""
        return self.share(self.together(work if self.is_main else _nothing))

    def share(self, value: T) -> T:
        """Rank 0's ``value`` on every rank."""
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, value: Any) -> list:
        """Every rank's ``value``, in rank order."""
        values: list = [None] * self.world_size
        dist.all_gather_object(values, value)
        return values

    def sum_numbers(self, *numbers: float | Tensor) -> list[float]:
        """The sums over the ranks of a few numbers (Python or one-element tensors)."""
        packed = torch.tensor([float(n) for n in numbers], dtype=torch.float64)
        dist.all_reduce(packed)
        return packed.tolist()

    def same_random_state(self) -> None:
        """Rank 0's torch random state (CPU, and this rank's GPU) on every rank: the same
        permutation and augmentation everywhere, whatever a rank drew before."""
        states = [torch.get_rng_state()]
        if self.device.type == "cuda":
            states.append(torch.cuda.get_rng_state(self.device))
        for state in states:
            dist.broadcast(state, src=0)
        torch.set_rng_state(states[0])
        if self.device.type == "cuda":
            torch.cuda.set_rng_state(states[1], self.device)

    # -- tensors of the model (``group``)

    def broadcast_(self, tensors: Sequence[Tensor]) -> None:
        """Rank 0's values of ``tensors``, in place on every rank."""
        for flat, members in _flat_groups(tensors):
            dist.broadcast(flat, src=0, group=self.group)
            _unflatten_into(flat, members)

    def sum_(self, tensors: Sequence[Tensor]) -> None:
        """The sums over the ranks of ``tensors``, in place."""
        for flat, members in _flat_groups(tensors):
            dist.all_reduce(flat, group=self.group)
            _unflatten_into(flat, members)

    def shard_bounds(self, size: int) -> list[int]:
        """Rank r's rows of a batch of ``size`` are bounds[r]:bounds[r + 1] (contiguous, sizes
        within one of each other)."""
        return [size * r // self.world_size for r in range(self.world_size + 1)]

    def gather_rows(self, rows: Tensor, bounds: Sequence[int]) -> Tensor:
        """The whole batch of which ``rows`` is this rank's shard (``bounds``: every rank's, as
        :meth:`shard_bounds` gives them), differentiable: gradients reach each rank's rows."""
        return _GatherRows.apply(rows, self, tuple(bounds))

    # -- failures

    def on_abort(self, cleanup: Callable[[], None]) -> None:
        """Run ``cleanup`` (rank 0: release the run folder) when this process is ended from
        outside: by another rank's failure, or by a SIGTERM."""
        self._abort_cleanups.append(cleanup)

    def announce(self, error: BaseException) -> int:
        """This rank is ending on ``error``: the others learn it now, unless it is shared (an
        error every rank raises at the same point). Returns the exit code, which a SIGTERM
        (torchrun's, once another rank has ended) also ends this process with from now on."""
        code = exit_code(error) or 1
        self._stopping, self._exit_code = True, code
        if not getattr(error, "every_rank", False):
            self._post(FAILURE, f"{self.rank}\t{code}\t{one_line(error)}")
        return code

    def done(self) -> None:
        """This rank has finished its run (every rank past the last barrier): failures posted
        from now on are not its concern, and the process group ends cleanly, NCCL's
        communicators freed before the process ends. After a failure it is left to the
        process's end: a collective of the failed step may still be pending."""
        self._stopping = True
        self.group = None
        if dist.is_initialized():
            dist.destroy_process_group()

    def _watch_for_failures(self) -> None:
        """Start the watcher thread. A SIGTERM (torchrun stops the other ranks once one has
        ended; a scheduler preempts the job) reaches it through Python's wakeup file even while
        the main thread waits inside a collective, where a signal handler cannot run."""
        wakeup, write_end = os.pipe()
        os.set_blocking(write_end, False)
        signal.signal(signal.SIGTERM, lambda *_: self._terminated())
        signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
        watcher = threading.Thread(target=self._watch, args=(wakeup,), name="moe_cl-ranks",
                                   daemon=True)
        watcher.start()
        atexit.register(self._stop_watching, watcher, write_end)

    def _stop_watching(self, watcher: threading.Thread, wakeup: int) -> None:
        """At exit, before the interpreter finalises: end the watcher and wait for it. A daemon
        thread still inside a call to the store when Python finalises is ended by a forced
        unwind through torch's C++ code, which aborts the process ("terminate called without
        an active exception", exit -6) after a run that had ended well."""
        self._stopping = True
        try:
            os.write(wakeup, b"\0")  # not SIGTERM's byte: it only ends the watcher's pause
        except OSError:
            pass
        watcher.join(timeout=4 * WATCH_INTERVAL_S)

    def _terminated(self) -> None:
        """Ended from outside: rank 0 releases the run folder; the exit code is that of the
        failure that ended the run (128 + SIGTERM when none did)."""
        self._clean_up()
        os._exit(self._exit_code if self._exit_code is not None else 128 + signal.SIGTERM)

    def _clean_up(self) -> None:
        for cleanup in self._abort_cleanups:
            try:
                cleanup()
            except Exception:  # noqa: BLE001 - the exit matters more than the cleanup
                pass

    def _pause(self, wakeup: int, seconds: float) -> None:
        """The watcher's sleep, ended by a SIGTERM (which ends the process)."""
        if select.select([wakeup], [], [], seconds)[0] and signal.SIGTERM in os.read(wakeup, 512):
            self._terminated()

    def _post(self, key: str, value: str) -> None:
        try:
            with self._store_lock:
                self._store.set(key, value)
        except Exception:  # noqa: BLE001 - the store ended with the launcher: nobody to tell
            return

    def _posted(self, key: str) -> str | None:
        """``key``'s value in the store (None if not posted); raises if the store is gone."""
        with self._store_lock:
            return self._store.get(key).decode() if self._store.check([key]) else None

    def wait_for_main(self, pause: Callable[[float], None] = time.sleep) -> None:
        """Until rank 0 has finished with the run folder (at most MAIN_DONE_WAIT_S), then a
        moment (LINGER_S) for its process to end first: torchrun stops the others as soon as
        one has ended (SIGTERM: this rank's exit code), and rank 0 must not be stopped in the
        middle of its last writes. On other machines, where no SIGTERM comes, the wait ends by
        itself."""
        deadline = time.monotonic() + MAIN_DONE_WAIT_S
        while time.monotonic() < deadline:
            try:
                if self._posted(MAIN_DONE) is not None:
                    break
            except Exception:  # noqa: BLE001 - the store is gone: so is rank 0
                return
            pause(WATCH_INTERVAL_S / 5)
        pause(LINGER_S)

    def _watch(self, wakeup: int) -> None:
        """The watcher thread: another rank's failure ends this process with its exit code
        (a process blocked in a collective cannot raise), without waiting for a timeout."""
        while not self._stopping:
            self._pause(wakeup, WATCH_INTERVAL_S)
            try:
                posted = self._posted(FAILURE)
            except Exception:  # noqa: BLE001 - the store (torchrun's) is gone
                posted = "-1\t1\tlost contact with the other ranks"
            if posted is not None and not self._stopping:
                rank, code, message = posted.split("\t", 2)
                if int(rank) != self.rank:
                    self._abort(int(rank), int(code), message, wakeup)

    def _abort(self, rank: int, code: int, message: str, wakeup: int) -> None:
        """Another rank failed: rank 0 releases the run folder, says so and ends first; the
        others end after it, with the same exit code."""
        self._exit_code = code
        if self.is_main:
            self._clean_up()
            cause = f"rank {rank} failed ({message})" if rank >= 0 else message
            print(f"error: {cause}; every rank stopped", file=sys.stderr, flush=True)
            self._post(MAIN_DONE, "")
        else:
            self.wait_for_main(lambda seconds: self._pause(wakeup, seconds))
        os._exit(code)


def _device_kind(setting: str, local_rank: int) -> str:
    """``cpu`` or ``cuda`` for ``device=setting`` on this rank; a usage error if the rank's GPU
    (number LOCAL_RANK on its node) is missing."""
    if setting == "cpu":
        return "cpu"
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if not gpus:
        if setting == "auto":
            return "cpu"
        raise ConfigError("device=cuda but no CUDA device is available (use device=auto or cpu)")
    if local_rank >= gpus:
        raise ConfigError(f"device={setting}: local rank {local_rank} on {socket.gethostname()} "
                          f"has no GPU of its own ({gpus} there); start at most {gpus} "
                          f"processes per node (--nproc_per_node {gpus})")
    return "cuda"


def _flat_groups(tensors: Sequence[Tensor]) -> list[tuple[Tensor, list[Tensor]]]:
    """``tensors`` grouped by device and type, each group as one flat tensor (booleans as
    bytes) and its members: one collective per group instead of one per tensor."""
    groups: dict[tuple, list[Tensor]] = {}
    for tensor in tensors:
        groups.setdefault((tensor.device, tensor.dtype), []).append(tensor)
    flats = []
    for members in groups.values():
        flat = torch.cat([_transportable(t.detach()).reshape(-1) for t in members])
        flats.append((flat, members))
    return flats


def _transportable(tensor: Tensor) -> Tensor:
    return tensor.view(torch.uint8) if tensor.dtype == torch.bool else tensor


@torch.no_grad()
def _unflatten_into(flat: Tensor, members: list[Tensor]) -> None:
    offset = 0
    for tensor in members:
        count = tensor.numel()
        _transportable(tensor).copy_(flat[offset:offset + count].view(tensor.shape))
        offset += count


class _GatherRows(torch.autograd.Function):
    """All ranks' shards of a batch, concatenated in rank order; the backward pass sums the
    gradient of the whole batch over the ranks (each rank's loss reaches every row) and keeps
    this rank's rows."""

    @staticmethod
    def forward(ctx, rows: Tensor, ranks: Ranks, bounds: tuple[int, ...]) -> Tensor:
        ctx.ranks, ctx.bounds = ranks, bounds
        sizes = [bounds[r + 1] - bounds[r] for r in range(ranks.world_size)]
        padded = rows.new_zeros((max(sizes), *rows.shape[1:]))
        padded[: len(rows)] = rows
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded, group=ranks.group)
        return torch.cat([part[:size] for part, size in zip(parts, sizes, strict=True)])

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        ranks, bounds = ctx.ranks, ctx.bounds
        total = grad.contiguous().clone()
        dist.all_reduce(total, group=ranks.group)
        return total[bounds[ranks.rank]:bounds[ranks.rank + 1]], None, None
