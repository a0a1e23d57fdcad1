"""The device mesh from `[parallel]`: dp x fsdp x tp processes, started by torchrun.

One process without torchrun (and a 1 x 1 x 1 mesh) needs no process group at all: then
`Parallel.single` is True and every method here is a cheap no-op, so the stages run as before.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from scalelab.config import ParallelConfig, RunFailed, UserError
from scalelab.parallel.rules import MESH_AXES, Rules, make_rules


def mesh_shape(pc: ParallelConfig, world: int) -> dict[str, int]:
    """{'dp','fsdp','tp'} sizes whose product is `world`; at most one may be -1 (inferred)."""
    sizes = {"dp": pc.dp, "fsdp": pc.fsdp, "tp": pc.tp}
    for axis, n in sizes.items():
        if not isinstance(n, int) or (n < 1 and n != -1):
            raise UserError(f"parallel.{axis}: must be a positive integer or -1, got {n!r}")
    free = [a for a, n in sizes.items() if n == -1]
    if len(free) > 1:
        raise UserError(f"parallel: only one of dp, fsdp, tp may be -1 (got {', '.join(free)})")
    known = math.prod(n for n in sizes.values() if n != -1)
    if free:
        if world % known:
            raise UserError(f"parallel.{free[0]}=-1: world size {world} does not divide by "
                            f"the other axes ({known})")
        sizes[free[0]] = world // known
    if math.prod(sizes.values()) != world:
        raise UserError(f"parallel: dp*fsdp*tp = {sizes['dp']}*{sizes['fsdp']}*{sizes['tp']} "
                        f"= {math.prod(sizes.values())} but the world size is {world} "
                        "(set it with torchrun --nproc-per-node/--nnodes)")
    return sizes


@dataclass
class Parallel:
    sizes: dict[str, int]
    rules: Rules
    device: torch.device
    mesh: object = None  # DeviceMesh with dims ("dp", "fsdp", "tp"); None in one process
    rank: int = 0
    groups: dict[frozenset, str] = field(default_factory=dict)  # group ranks -> axis
    waits: object = None  # the CPU group barrier() and together() wait in (wait_group)

    @property
    def single(self) -> bool:
        return self.mesh is None

    @property
    def world(self) -> int:
        return math.prod(self.sizes.values())

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def data_world(self) -> int:  # ranks that read different data: dp x fsdp
        return self.sizes["dp"] * self.sizes["fsdp"]

    @property
    def data_rank(self) -> int:  # tp ranks of one group share it, so they read the same rows
        if self.single:
            return 0
        c = self.mesh.get_coordinate()
        return c[0] * self.sizes["fsdp"] + c[1]

    def barrier(self) -> None:
        """Wait until every rank is here (the others may wait long: see wait_group)."""
        if not self.single:
            dist.barrier(group=self.waits)

    @contextlib.contextmanager
    def together(self):
        """Collective: a UserError or RunFailed (a write error) raised inside on some ranks
        only (a file only they read or write) is raised on every rank, the first such
        rank's, so rank 0 reports it (only rank 0 prints) and no rank waits in a collective
        for one that has left. Ranks that finish early wait for the rest (see wait_group):
        rank 0 alone may do long work inside (sampling a data set)."""
        error = None
        try:
            yield
        except (UserError, RunFailed) as e:
            error = e
        if not self.single:
            seen: list[Exception | None] = [None] * self.world
            dist.all_gather_object(seen, error, group=self.waits)
            error = next((e for e in seen if e is not None), None)
        if error is not None:
            raise error

    def mean_over_data(self, x: torch.Tensor) -> torch.Tensor:
        """Average a per-rank scalar (a loss) over data ranks (tp ranks hold equal copies)."""
        if self.single:
            return x
        x = x.detach().clone()
        dist.all_reduce(x)  # over the whole world: each data rank's value appears tp times
        return x / self.world

    def sum_over_data(self, *counts: int) -> list[int]:
        """Sum per-rank counts (tokens, pairs) over data ranks, in one all-reduce."""
        if self.single:
            return list(counts)
        t = torch.tensor(counts, dtype=torch.long, device=self.device)
        dist.all_reduce(t)  # over the world: each data rank's counts appear tp times
        return [int(n) // self.sizes["tp"] for n in t.tolist()]


# How long barrier() and together() wait for the slowest rank: rank 0 alone may train a
# tokenizer, write token files or sample a preference set meanwhile (hours on a big corpus),
# longer than a GPU collective may wait (NCCL's timeout, minutes) before the run is killed.
WAIT = timedelta(hours=24)
_waits: tuple = (None, None)  # (the default process group, its wait group)


def wait_group():
    """A gloo (CPU) process group over every rank with a long timeout (WAIT), made once per
    default process group: waiting in it ties up no GPU collective."""
    global _waits
    world = dist.group.WORLD
    if _waits[0] is not world:
        _waits = (world, dist.new_group(backend="gloo", timeout=WAIT))
    return _waits[1]


def setup(pc: ParallelConfig, device_name: str = "auto") -> Parallel:
    """Read the torchrun environment, check the mesh shape, start the process group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    sizes = mesh_shape(pc, world)
    rules = make_rules(pc.rules)
    from scalelab.hardware import pick_device
    asked = pick_device(device_name)  # a device this machine lacks: exit 2, not a CPU run
    if world == 1:
        return Parallel(sizes, rules, asked)
    if asked.type == "cuda" and asked.index is not None:
        raise UserError(f"train.device {device_name!r}: under torchrun each process takes the "
                        "GPU of its LOCAL_RANK, so one GPU index cannot apply to all of them; "
                        "set train.device = \"cuda\" (or \"auto\") and choose the GPUs with "
                        "CUDA_VISIBLE_DEVICES")
    if asked.type not in ("cuda", "cpu"):
        raise UserError(f"train.device {device_name!r}: a mesh runs on CUDA GPUs (NCCL) or "
                        "on the CPU (gloo)")
    cuda = asked.type == "cuda"  # each rank takes GPU LOCAL_RANK
    if cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    from torch.distributed.device_mesh import init_device_mesh
    mesh = init_device_mesh(device.type, tuple(sizes[a] for a in MESH_AXES),
                            mesh_dim_names=MESH_AXES)
    # Name each process group by the ranks it spans (group names differ between meshes).
    groups = {frozenset(dist.get_process_group_ranks(mesh.get_group(a))): a for a in MESH_AXES}
    groups.setdefault(frozenset(range(world)), "world")
    return Parallel(sizes, rules, device, mesh, dist.get_rank(), groups, wait_group())
