"""Several processes, one job: PyTorch's own distributed stack, seen from the run layer.

A job runs in several processes when it is started by ``torchrun``
(``torch.distributed.run``), on one machine or many, or by ``--processes N``,
which calls the same launcher for one machine (:func:`launch`). Every process
runs the same command; this module tells them apart and lets them agree:

- :func:`world` reads ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK``, the variables
  torchrun sets; :func:`setup` joins the process group (``gloo`` on the CPU,
  ``nccl`` on CUDA) with a timeout, so that a collective waiting on a dead rank
  fails with a message instead of hanging. torchrun's elastic agent stops the
  other workers the moment one exits with an error.
- :func:`shard` gives each rank a contiguous block of ``n`` items (evaluation),
  :func:`split_batch` each rank its share of a global minibatch (training).
- Rank 0 alone writes files. :func:`agree` runs a check on rank 0 and raises
  its error on every rank, so no rank is left waiting for one that gave up.
- :func:`all_sum`, :func:`all_max` and :func:`gather` are the collectives the
  toolkit needs; with one process they return their input.

Nothing here launches, schedules or discovers processes itself.
"""

from __future__ import annotations

import atexit
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["World", "world", "setup", "is_main", "shard", "split_batch", "agree", "all_sum", "all_max", "gather",
           "barrier", "teardown", "launch", "LaunchError", "DEFAULT_TIMEOUT"]

#: seconds a collective waits for the other ranks before the job fails (``PPL_GENMODELS_TIMEOUT`` overrides)
DEFAULT_TIMEOUT = 1800.0


class LaunchError(RuntimeError):
    """A worker of a multi-process job failed (one-line message; ``exitcode`` is the first failed worker's
    status: negative for a signal)."""

    def __init__(self, message: str, exitcode: int = 1):
        super().__init__(message)
        self.exitcode = exitcode


@dataclass(frozen=True)
class World:
    """Where this process stands: ``rank`` of ``size`` processes, ``local_rank`` on its machine."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise LaunchError(f"environment variable {name}={value!r} is not an integer") from None


def world() -> World:
    """The process's place in the job, from torchrun's environment (one process without it)."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size(), _env_int("LOCAL_RANK", 0))
    return World(_env_int("RANK", 0), _env_int("WORLD_SIZE", 1), _env_int("LOCAL_RANK", 0))


def is_main() -> bool:
    """True on rank 0 (and in a single process): the one process that writes files."""
    return world().rank == 0


def timeout() -> datetime.timedelta:
    """How long a collective waits for the other ranks."""
    value = os.environ.get("PPL_GENMODELS_TIMEOUT")
    seconds = DEFAULT_TIMEOUT if not value else float(value)
    return datetime.timedelta(seconds=seconds)


def setup(device: torch.device | str | None = None) -> World:
    """Join the process group when torchrun started several processes; return :func:`world`.

    The backend is ``nccl`` for a CUDA device, else ``gloo``. A CUDA process uses
    the GPU of its ``LOCAL_RANK`` when the device names no index. Calling it again
    is harmless.
    """
    here = world()
    if not here.distributed or dist.is_initialized():
        return here
    cuda = device is not None and torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.set_device(here.local_rank if torch.device(device).index is None else torch.device(device).index)
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timeout())
    atexit.register(teardown)  # a process group left alive at exit can abort the interpreter (gloo)
    return world()


#: seconds a rank that stopped on an error waits for its peers before it leaves the process group
ERROR_WAIT = 30.0


def teardown(synchronize: bool = False, *, wait: float | None = None) -> None:
    """Leave the process group (at the end of a command; also registered to run at exit).

    A rank that destroys its ``gloo`` connections while a peer is still sending on them
    (a peer's last broadcast, say) can make one of them abort at exit (``terminate called
    without an active exception``). So:

    - ``synchronize``: first wait at a barrier until every rank is done with its
      collectives; for ranks that finished normally.
    - ``wait`` (seconds): after an error, meet the peers at a barrier that gives up after
      ``wait`` seconds (gloo's ``monitored_barrier``), since a peer may be dead or busy
      elsewhere. All ranks that stopped on the same error (a divergence, which every rank
      sees at the same step) leave together; a missing peer costs at most ``wait``. On
      nccl, which has no such barrier, an error leaves at once.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    if dist.get_world_size() > 1:
        if synchronize:
            dist.barrier()
        elif wait is not None and dist.get_backend() == "gloo":
            try:
                dist.monitored_barrier(timeout=datetime.timedelta(seconds=wait), wait_all_ranks=True)
            except RuntimeError:  # a peer that did not come: leave without it
                pass
    dist.destroy_process_group()


def local_device(device: torch.device) -> torch.device:
    """``cuda`` without an index becomes this process's GPU (``LOCAL_RANK``); other devices stay."""
    if device.type == "cuda" and device.index is None and world().distributed:
        return torch.device("cuda", world().local_rank)
    return device


def shard(n: int, here: World | None = None) -> tuple[int, int]:
    """This rank's contiguous block ``[start, stop)`` of ``n`` items (sizes differ by at most one)."""
    here = here or world()
    base, extra = divmod(n, here.size)
    start = here.rank * base + min(here.rank, extra)
    return start, start + base + (1 if here.rank < extra else 0)


def split_batch(rows: torch.Tensor, here: World | None = None) -> torch.Tensor:
    """This rank's share of a global minibatch ``rows`` (contiguous; sizes differ by at most one)."""
    start, stop = shard(rows.shape[0], here)
    return rows[start:stop]


def _device_for_collectives() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_reduce(value: torch.Tensor, op) -> torch.Tensor:
    """``value`` reduced with ``op`` over all ranks, as a new tensor on its device (itself in one process)."""
    if not world().distributed:
        return value
    reduced = value.detach().to(_device_for_collectives(), copy=True)
    dist.all_reduce(reduced, op=op)
    return reduced.to(value.device)


def all_sum(value: torch.Tensor) -> torch.Tensor:
    """The sum of ``value`` over all ranks (a new tensor on ``value``'s device; itself in one process)."""
    return _all_reduce(value, dist.ReduceOp.SUM)


def all_max(value: torch.Tensor) -> torch.Tensor:
    """The elementwise maximum of ``value`` over all ranks (itself in one process); stays on the device."""
    return _all_reduce(value, dist.ReduceOp.MAX)


def gather(value):
    """Every rank's ``value`` as a list in rank order, on rank 0; None on the other ranks."""
    here = world()
    if not here.distributed:
        return [value]
    out = [None] * here.size if here.rank == 0 else None
    dist.gather_object(value, out, dst=0)
    return out


def peer_failure(err: BaseException) -> bool:
    """True for the errors a collective raises when another rank died or timed out."""
    if not world().distributed:
        return False
    if isinstance(err, getattr(dist, "DistError", ())):
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and any(word in text for word in ("gloo", "nccl", "connection", "timed out"))


def barrier() -> None:
    if world().distributed:
        dist.barrier()


def agree(check):
    """Run ``check()`` on rank 0 and give its result to every rank; its exception is raised on every rank.

    For what must be decided once (is the run directory free? which result-set name?)
    so that a rank never waits in a collective for a rank that gave up.
    """
    here = world()
    if not here.distributed:
        return check()
    box = [None, None]
    if here.rank == 0:
        try:
            box[0] = check()
        except Exception as err:  # noqa: BLE001 - handed to every rank, then raised there
            box[1] = err
    dist.broadcast_object_list(box, src=0)
    if box[1] is not None:
        raise box[1]
    return box[0]


def launch(processes: int, argv: list[str]) -> int:
    """Run ``python -m ppl_genmodels ARGV`` in ``processes`` workers on this machine, through torchrun's launcher.

    The same as ``torchrun --standalone --nproc-per-node PROCESSES -m ppl_genmodels ARGV``:
    PyTorch's elastic agent starts the workers, sets their ranks, and stops them all when
    one fails. Each worker gets ``OMP_NUM_THREADS`` = cores / processes unless it is set.
    Returns 0; a failed worker raises :class:`LaunchError` naming its rank and exit code.
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser
    from torch.distributed.run import run as torchrun

    if processes < 1:
        raise LaunchError(f"--processes must be >= 1, got {processes}")
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // processes)))
    args = get_args_parser().parse_args(["--standalone", "--nproc-per-node", str(processes), "--max-restarts", "0",
                                         "--monitor-interval", "0.5", "-m", "ppl_genmodels", *argv])
    try:
        torchrun(args)
    except ChildFailedError as err:
        rank, failure = err.get_first_failure()
        code = failure.exitcode
        how = f"was killed by signal {-code}" if code is not None and code < 0 else f"exited with code {code}"
        raise LaunchError(f"worker {rank} of {processes} {how}; the job was stopped (its own message, if any, "
                          "is above)", code if code is not None else 1) from None
    return 0
