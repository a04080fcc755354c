"""The catalog build on Ray: chunks computed by workers on a cluster's CPUs / GPUs, the catalog
written by the driver alone.

``python -m data_index build --workspace WS ... --ray [ADDRESS]`` calls
:func:`build_catalog_ray`. Ray is optional: only this module imports it, and only when called
(``pip install ray``; the project pins the version it is tested with in requirements.txt).

How it works: the driver plans the build exactly like :func:`~data_index.catalog.build_catalog`
(same chunks, same resume rules, the same workspace lock) and hands each chunk still to do to a
Ray actor (:class:`ChunkWorker`: one loaded model per actor, one GPU each when the device is CUDA
and the cluster has GPUs, else CPUs). Each actor reads and decodes its chunk's image files and
runs :func:`~data_index.embed.compute_chunk` -- the code a single-process build runs -- and
returns the chunk's rows and embeddings. The driver commits the chunks **in chunk order**
(results that come back early wait, at most two per worker), each in one transaction, then
assembles the layer stores: the catalog equals a single-process build's, and a killed Ray build
resumes from its committed chunks like any other. One progress view: the driver's
:class:`~explorer_core.progress.Meter` (``"k/K chunks saved"`` after each chunk).

Where it runs:

* **one machine, several GPUs** (or many cores): ``--ray`` without an address starts a local Ray
  with this machine's CPUs and GPUs and stops it at the end; ``--ray-workers`` sets the number
  of actors (default: one per GPU with ``--device cuda``/``auto`` on a GPU machine, else one per
  two CPUs).
* **a cluster**: start Ray on the nodes (``ray start --head`` on one, ``ray start
  --address=HEAD:6379`` on the others), then run the build on the head (or any node) with
  ``--ray HEAD:6379`` (or ``--ray auto``). Workers read the image files themselves, so the image
  folder must be visible at the same path on every node (a shared file system), and so must
  this project (workers import it: the driver puts its folder on the workers' ``PYTHONPATH``).
  Only the driver writes the workspace.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from explorer_core.errors import ExplorerError
from explorer_core.progress import ProgressFn

from .catalog import BuildStats, ChunkResult, ChunkSource, _Plan, build_catalog
from .crops import CropGrid
from .datasets import ImageEntry
from .embed import Embedder, compute_chunk, min_side_of, stream_decoded
from .workspace import Workspace

__all__ = ["ChunkWorker", "build_catalog_ray", "init_ray", "ray_source"]

ROOT = Path(__file__).resolve().parents[1]


def _ray() -> Any:
    try:
        import ray
    except ImportError as exc:
        raise ExplorerError("--ray needs the Ray package: pip install 'ray==2.60.0' (see "
                            "requirements.txt), or build without --ray") from exc
    return ray


def init_ray(address: str | None = None, num_cpus: int | None = None, **kwargs: Any) -> bool:
    """Connect to the Ray cluster at ``address`` (``None``: start a local Ray, with
    ``num_cpus`` CPUs if given). Workers get this project on their ``PYTHONPATH`` and passive
    OpenMP waiting. Returns False when Ray was already initialised (nothing done)."""
    ray = _ray()
    if ray.is_initialized():
        return False
    path = [str(ROOT), *[p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]]
    env = {"PYTHONPATH": os.pathsep.join(path), "OMP_WAIT_POLICY": "PASSIVE"}
    opts: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False,
                            "runtime_env": {"env_vars": env}, **kwargs}
    if address is None and num_cpus is not None:
        opts["num_cpus"] = int(num_cpus)
    try:
        ray.init(address=address, **opts)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise ExplorerError(f"Cannot start or reach Ray at {address or 'this machine'}: "
                            f"{exc}") from exc
    return True


class ChunkWorker:
    """A Ray actor: one loaded model, computing whole chunks (see the module docstring)."""

    def __init__(self, spec: str, device: str, layers: list[str], mode: str,
                 grid: tuple[int, int, int], batch_size: int, threads: int) -> None:
        import torch

        from explorer_core.models import shared_model

        torch.set_num_threads(max(1, int(threads)))
        self.lm = shared_model(spec, device)
        self.grid = CropGrid(*grid)
        self.embedder = Embedder(self.lm, layers, mode, self.grid, batch_size)
        workers = max(1, min(4, int(threads)))
        self.window = max(2 * self.embedder.images_per_batch, 2 * workers)
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="decode")

    def run(self, chunk_id: int, first_id: int, entries: list[ImageEntry]) -> ChunkResult:
        stream = stream_decoded(entries, self.lm, self.grid.image_size, min_side_of(self.grid),
                                self.pool, self.window)
        try:
            return compute_chunk(self.embedder, chunk_id, first_id, entries, stream)
        finally:
            stream.close()


def _placement(device: str, workers: int | None) -> tuple[int, str, float, int]:
    """``(workers, worker device, GPUs per worker, CPUs per worker)`` from the cluster."""
    ray = _ray()
    res = ray.cluster_resources()
    cpus, gpus = max(1, int(res.get("CPU", 1))), int(res.get("GPU", 0))
    if device == "cuda" and not gpus:
        raise ExplorerError("--device cuda asked for, but the Ray cluster has no GPUs; use "
                            "--device cpu or auto")
    use_gpu = device in ("cuda", "auto", "") and gpus > 0
    n = int(workers or (gpus if use_gpu else max(1, cpus // 2)))
    if use_gpu and n > gpus:
        raise ExplorerError(f"--ray-workers {n}: the cluster has {gpus} GPUs (one per worker)")
    per_cpu = max(1, cpus // n)
    if n * per_cpu > cpus:
        raise ExplorerError(f"--ray-workers {n}: the cluster has {cpus} CPUs")
    return n, "cuda" if use_gpu else "cpu", 1.0 if use_gpu else 0.0, per_cpu


def ray_source(spec: str, device: str = "auto", workers: int | None = None,
               batch_size: int = 32) -> ChunkSource:
    """A :data:`~data_index.catalog.ChunkSource` computing chunks on Ray actors, yielded in the
    order asked (Ray must be initialised, see :func:`init_ray`)."""

    def source(plan: _Plan, todo: list[int], on_images: Callable[[int, int], None]
               ) -> Iterator[ChunkResult]:
        ray = _ray()
        n, dev, gpu, cpu = _placement(device, workers)
        actor_cls = ray.remote(num_cpus=cpu, num_gpus=gpu)(ChunkWorker)
        grid = (plan.grid.image_size, plan.grid.crop_size, plan.grid.stride)
        actors = [actor_cls.remote(spec, dev, plan.layers, plan.ws.mode, grid, batch_size, cpu)
                  for _ in range(n)]
        load = [0] * n
        pending: dict[Any, tuple[int, int]] = {}  # ref -> (chunk, actor)
        ready: dict[int, ChunkResult] = {}
        submitted = yielded = 0
        try:
            while yielded < len(todo):
                # at most two chunks queued per actor and 2 * n chunks not yet committed
                while submitted < len(todo) and submitted - yielded < 2 * n and min(load) < 2:
                    a = load.index(min(load))
                    k = todo[submitted]
                    ref = actors[a].run.remote(k, k * plan.chunk_size, plan.chunk(k))
                    pending[ref] = (k, a)
                    load[a] += 1
                    submitted += 1
                want = todo[yielded]
                if want in ready:
                    yield ready.pop(want)
                    yielded += 1
                    continue
                done, _ = ray.wait(list(pending), num_returns=1)
                for ref in done:
                    k, a = pending.pop(ref)
                    load[a] -= 1
                    try:
                        ready[k] = ray.get(ref)
                    except ray.exceptions.RayTaskError as exc:
                        cause = getattr(exc, "cause", None)
                        if isinstance(cause, ExplorerError):
                            raise ExplorerError(str(cause)) from None
                        raise
                    on_images(k, ready[k].n_files)
        finally:
            for actor in actors:
                ray.kill(actor)

    return source


def build_catalog_ray(ws: Workspace, address: str | None = None, *, workers: int | None = None,
                      batch_size: int = 32, device: str = "auto",
                      progress: ProgressFn | None = None, limit: int | None = None,
                      model: Any = None, chunk_size: int = 256, rebuild: bool = False,
                      num_cpus: int | None = None, index: str = "auto",
                      memory_budget: int | str | None = None) -> BuildStats:
    """Build (or resume) the catalog of ``ws`` with Ray workers (see the module docstring).

    ``address``: a Ray cluster (``HOST:PORT`` or ``auto``); ``None`` starts a local Ray (with
    ``num_cpus`` CPUs if given) and stops it afterwards; an already initialised Ray is used as
    it is. The other parameters are :func:`~data_index.catalog.build_catalog`'s; ``model`` is
    the driver's copy (for the layers' shapes; loaded on the CPU when not given)."""
    if model is None:
        from explorer_core.models import shared_model

        model = shared_model(ws.model, "cpu")
    ray = _ray()
    started = init_ray(address, num_cpus)
    try:
        dev = ws.device if device in (None, "", "auto") else device
        return build_catalog(ws, batch_size=batch_size, progress=progress, limit=limit,
                             model=model, chunk_size=chunk_size, rebuild=rebuild,
                             index=index, memory_budget=memory_budget,
                             source=ray_source(ws.model, dev or "auto", workers, batch_size))
    finally:
        if started:
            ray.shutdown()
