"""Run the analyses of a store on a ``dask.distributed`` cluster.

A store opens as a Dataset of dask arrays (:func:`attnlens.open_store`), and every analysis
(:func:`~attnlens.analysis.find_sinks`, :func:`~attnlens.analysis.find_magnets`,
:func:`~attnlens.analysis.redistribution`, :func:`~attnlens.analysis.rank`, …) builds lazy
reductions of it and computes only small results. So computing under a ``dask.distributed``
``Client`` runs them on that cluster, chunk by chunk, each worker reading its chunks straight
from the store (local disk, NFS or object storage): nothing here is specific to attnlens but
:func:`cluster`, which connects to a scheduler or starts a local cluster for the block.

>>> import attnlens
>>> from attnlens.analysis import find_sinks
>>> from attnlens.analysis.synthetic import planted
>>> ds = planted().chunk({"sample": 1})
>>> with attnlens.cluster(workers=2, processes=False) as client:  # doctest: +SKIP
...     sinks = find_sinks(ds).compute()  # runs on the two workers

With a remote cluster the store must be one the workers can read (a path they share, or a URL
such as ``s3://…``), not ``memory://``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from .errors import ClusterError, InputError

__all__ = ["cluster"]


@contextlib.contextmanager
def cluster(
    scheduler: Any = None,
    *,
    workers: int | None = None,
    threads_per_worker: int = 1,
    memory_limit: str | int | None = None,
    processes: bool = True,
    timeout: float = 10.0,
) -> Iterator[Any]:
    """Within the block, dask computes on a ``dask.distributed`` cluster; yields its ``Client``.

    Args:
        scheduler: a scheduler's address (``"tcp://host:8786"``) to connect to, or a
            ``distributed.Client`` to use (left open); ``None`` with ``workers`` to start a
            local cluster, ``None`` without them: dask's default scheduler, in this process
            (yields ``None``).
        workers: start a ``LocalCluster`` of this many workers, closed after the block.
        threads_per_worker: threads of each started worker.
        memory_limit: each started worker's memory limit (``"2GiB"``, bytes); workers spill
            to disk beyond it (default: the machine's memory shared among them). Thread
            workers (``processes=False``) apply it to the data they hold only.
        processes: start workers as processes (``False``: threads of this process).
        timeout: seconds to wait for the scheduler before giving up.

    Raises:
        ClusterError: the scheduler cannot be reached, or the cluster cannot start.
        InputError: both ``scheduler`` and ``workers``, or a worker count below 1.
    """
    import dask

    if scheduler is not None and workers is not None:
        raise InputError("give a scheduler address or a number of workers to start, not both")
    if workers is not None and workers < 1:
        raise InputError(f"--workers must be 1 or more; got {workers}")
    if scheduler is None and workers is None:
        yield None
        return
    try:
        from distributed import Client, LocalCluster
    except ImportError as exc:
        raise ClusterError("dask.distributed is not installed: pip install distributed") from exc
    if isinstance(scheduler, Client):
        with dask.config.set(scheduler=scheduler):
            yield scheduler
        return
    with contextlib.ExitStack() as stack:
        if scheduler is not None:
            address = str(scheduler)
            if "://" not in address:
                raise InputError(f"scheduler address {address!r}: give it as tcp://host:port")
            try:
                client = Client(address, timeout=timeout, set_as_default=False)
            except (OSError, TimeoutError) as exc:
                raise ClusterError(
                    f"no dask scheduler reachable at {address} within {timeout:g} s "
                    f"({type(exc).__name__}); start one with `dask scheduler` or give --workers N"
                ) from None
        else:
            options: dict[str, Any] = {"n_workers": workers, "threads_per_worker": threads_per_worker}
            options["processes"] = processes
            options["dashboard_address"] = None
            if memory_limit is not None:
                options["memory_limit"] = memory_limit
                if not processes:
                    # thread workers share this process, whose memory says nothing of each worker's:
                    # they keep the limit on the data they hold (spilling beyond it), never pause
                    memory = "distributed.worker.memory."
                    off = {memory + k: False for k in ("spill", "pause", "terminate")}
                    stack.enter_context(dask.config.set(off))
            try:
                local = stack.enter_context(LocalCluster(**options))
            except (OSError, TimeoutError, ValueError) as exc:
                raise ClusterError(f"cannot start a local cluster of {workers} worker(s): {exc}") from None
            client = Client(local, set_as_default=False)
        stack.callback(client.close)
        with dask.config.set(scheduler=client):
            yield client
