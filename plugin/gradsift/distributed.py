"""Scoring with several processes: join the ranks a launcher started (torchrun, `accelerate launch`), coordinate them.

Ranks exchange only small control messages (which shards are finished, whether every rank succeeded) over a gloo
group, on CPUs and GPUs alike, so no NCCL communicator or GPU memory is spent on coordination. Scores travel through
the score folder's shard files: every process must see the same folder (on several machines, a shared filesystem).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

from gradsift.errors import UserError

T = TypeVar("T")
# How long a rank waits for the others at a meeting point. Ranks meet after scoring, where the wait is the imbalance
# between ranks (about one shard, since shards are balanced by tokens); a crashed rank is normally noticed sooner,
# because torchrun and accelerate stop the other ranks when one exits with an error.
TIMEOUT = timedelta(hours=3)


@dataclass(frozen=True)
class Team:
    """The processes scoring one dataset together: this process's rank, their number, and a gloo group.

    A default `Team()` is a single process; its collective methods then do nothing but run locally.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    group: Any = None

    @property
    def is_main(self) -> bool:
        """Whether this is rank 0, the process that writes the manifest, merges and prints."""
        return self.rank == 0

    def broadcast(self, value: T) -> T:
        """Return rank 0's `value` on every rank (a picklable object)."""
        if self.world_size == 1:
            return value
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def gather(self, value: T) -> list[T]:
        """Return every rank's `value`, indexed by rank, on every rank."""
        if self.world_size == 1:
            return [value]
        import torch.distributed as dist

        values: list[Any] = [None] * self.world_size
        dist.all_gather_object(values, value, group=self.group)
        return values

    def on_main(self, action: Callable[[], T]) -> T:
        """Run `action` on rank 0 only and return its result on every rank; its error is raised on every rank."""
        result, error = None, None
        if self.is_main:
            try:
                result = action()
            except Exception as caught:  # re-raised below, after the other ranks heard of it
                error = caught
        result, message = self.broadcast((result, _describe(error)))
        if error is not None:
            raise error
        if message is not None:
            _raise_for(f"Rank 0 of {self.world_size} failed: ", [message])
        return result

    def on_every_rank(self, action: Callable[[], T]) -> T:
        """Run `action` on each rank, then meet; if any rank failed, raise on every rank (so none waits in vain)."""
        result, error = None, None
        try:
            result = action()
        except Exception as caught:  # re-raised below, after the other ranks heard of it
            error = caught
        messages = self.gather(_describe(error))
        if error is not None:
            raise error
        failed = [(rank, message) for rank, message in enumerate(messages) if message is not None]
        if failed:
            prefix = f"{len(failed)} of {self.world_size} ranks failed; "
            _raise_for(prefix, [(user, f"rank {rank}: {text}") for rank, (user, text) in failed])
        return result


def _describe(error: BaseException | None) -> tuple[bool, str] | None:
    """What the other ranks hear of an error: whether it is the user's mistake, and its text."""
    if error is None:
        return None
    if isinstance(error, UserError):
        return True, str(error)
    return False, f"{type(error).__name__}: {error}"


def _raise_for(prefix: str, messages: list[tuple[bool, str]]) -> None:
    """Raise another rank's failure here: a `UserError` if every failure was the user's mistake, else a bug."""
    text = prefix + "; ".join(message for _, message in messages)
    if all(user for user, _ in messages):
        raise UserError(text)
    raise RuntimeError(text)


@dataclass(frozen=True)
class LaunchEnv:
    """What a launcher tells each process through the environment."""

    rank: int
    world_size: int
    local_rank: int


def launch_env(environ: Mapping[str, str] | None = None) -> LaunchEnv:
    """Read `WORLD_SIZE`, `RANK` and `LOCAL_RANK` (set by torchrun and `accelerate launch`); alone if unset."""
    environ = os.environ if environ is None else environ
    world_size = _env_int(environ, "WORLD_SIZE", "1")
    if world_size < 1:
        raise UserError(f"`WORLD_SIZE` must be at least 1; got {world_size}. Unset it to score in one process.")
    if world_size == 1:
        return LaunchEnv(rank=0, world_size=1, local_rank=0)
    missing = [key for key in ("RANK", "LOCAL_RANK") if key not in environ]
    if missing:
        raise UserError(
            f"`WORLD_SIZE` is {world_size} but {' and '.join(f'`{key}`' for key in missing)} "
            f"{'is' if len(missing) == 1 else 'are'} not set. Start the "
            "processes with `torchrun --nproc_per_node N -m gradsift score ...` or `accelerate launch --multi_gpu "
            "--num_processes N -m gradsift score ...`, or unset `WORLD_SIZE` to score in one process."
        )
    rank = _env_int(environ, "RANK")
    if not 0 <= rank < world_size:
        raise UserError(f"`RANK` must be in [0, {world_size}) with `WORLD_SIZE` {world_size}; got {rank}.")
    return LaunchEnv(rank=rank, world_size=world_size, local_rank=_env_int(environ, "LOCAL_RANK"))


def _env_int(environ: Mapping[str, str], key: str, default: str | None = None) -> int:
    text = environ.get(key, default)
    try:
        return int(text)
    except (TypeError, ValueError):
        raise UserError(f"`{key}` must be an integer; got {text!r}. It is set by the launcher (torchrun).") from None


@contextmanager
def launched_team(use_cuda: bool) -> Iterator[Team]:
    """Join the processes a launcher started, for the duration of the block; without a launcher, a team of one.

    With `use_cuda`, each rank first makes `cuda:LOCAL_RANK` its current device, so models load onto their own GPU.
    A process group this opens is closed at the end; one that already exists (e.g. accelerate's) is reused, with a
    gloo subgroup for the control messages.
    """
    env = launch_env()
    if env.world_size == 1:
        yield Team()
        return
    import torch.distributed as dist

    if use_cuda:
        _use_local_gpu(env.local_rank)
    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo", timeout=TIMEOUT)  # env://: MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE
        group = None
    else:
        group = dist.new_group(backend="gloo", timeout=TIMEOUT)
    try:
        yield Team(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=env.local_rank, group=group)
    finally:
        dist.destroy_process_group(None if created else group)


def _use_local_gpu(local_rank: int) -> None:
    import torch

    count = torch.cuda.device_count()
    if local_rank >= count:
        raise UserError(
            f"`LOCAL_RANK` is {local_rank} but {count} CUDA device(s) are visible: start at most {count} processes "
            "per machine (--nproc_per_node / --num_processes), or score on CPU with --device cpu."
        )
    torch.cuda.set_device(local_rank)


def assign_shards(costs: Mapping[int, int], world_size: int) -> list[list[int]]:
    """Split shards among ranks, balanced by cost: each shard, costliest first, goes to the least-loaded rank.

    `costs` maps shard number to its cost (tokens). Ties go to the lower shard number and the lower rank, so every
    rank computes the same split. Returns each rank's shard numbers, in ascending order.
    """
    loads = [0] * world_size
    owned: list[list[int]] = [[] for _ in range(world_size)]
    for shard in sorted(costs, key=lambda k: (-costs[k], k)):
        rank = min(range(world_size), key=lambda r: (loads[r], r))
        loads[rank] += costs[shard]
        owned[rank].append(shard)
    return [sorted(shards) for shards in owned]
