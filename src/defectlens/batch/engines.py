"""Where a batch inspection runs: in this process (``local``, the default), or on Ray.

Both yield ``(path, Inspection | ImageError)`` and leave writing to one writer in this process,
so outputs are the same whichever engine ran. On Ray, workers are actors that load the model
once and inspect chunks of paths; a worker that dies is restarted by Ray and its chunk is run
again, and the writer keeps each image's first result only: nothing lost, nothing twice.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path

from tqdm.auto import tqdm

from defectlens.batch import ENGINES
from defectlens.errors import DefectLensError, ImageError
from defectlens.inference.inspection import Inspection
from defectlens.inference.inspector import Inspector
from defectlens.inference.tuning import stored_tuning

Result = tuple[Path, Inspection | ImageError]


def inspect_stream(inspector: Inspector, model_path: Path | None, paths: Sequence[Path], engine: str = "local", address: str | None = None,
                   workers: int = 0, chunk: int = 16, progress: bool = False, preview_side: int = 0) -> Iterator[Result]:
    """Each image's inspection, in input order for ``local``; with ``preview_side`` each carries a
    small copy of its image from the read that scored it, for the overlay."""
    if engine == "local":
        yield from zip(paths, inspector.inspect_many(paths, progress=progress, preview_side=preview_side), strict=True)
    elif engine == "ray":
        if model_path is None:
            raise DefectLensError("the ray engine needs the model file's path (workers load it themselves)")
        # workers run the driver's runtime, so a model that fell back to PyTorch here does there too
        choice = inspector.bundle.runtime
        runtime = "torch" if choice is not None and choice.runtime == "torch" else "auto"
        yield from _ray_stream(model_path, inspector.mask_method, paths, address, workers, chunk, progress, preview_side, runtime)
    else:
        raise DefectLensError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")


class InspectWorker:
    """One Ray actor: the model loaded once, then chunk after chunk of paths."""

    def __init__(self, model: str | bytes, suffix: str, mask_method: str, threads: int, runtime: str = "auto") -> None:
        import torch

        torch.set_num_threads(max(1, threads))  # workers share the machine's cores, not each all of them
        stored, _ = stored_tuning()  # this node's measured batch and decoding, with the worker's share of its cores
        tuning = replace(stored, threads=max(1, threads), faiss_threads=max(1, threads)) if stored else None
        if isinstance(model, str):  # a path: workers on the driver's machine
            self.inspector = Inspector.load(model, mask_method, runtime, tuning)
            return
        with tempfile.TemporaryDirectory() as tmp:  # the file's bytes: a cluster node may not see the driver's files
            path = Path(tmp) / f"model{suffix}"
            path.write_bytes(model)
            self.inspector = Inspector.load(path, mask_method, runtime, tuning)

    def inspect(self, paths: list[str], preview_side: int = 0) -> list[tuple[str, Inspection | ImageError]]:
        return list(zip(paths, self.inspector.inspect_many(paths, preview_side=preview_side), strict=True))


def _ray_stream(model_path: Path, mask_method: str, paths: Sequence[Path], address: str | None, workers: int, chunk: int,
                progress: bool, preview_side: int = 0, runtime: str = "auto") -> Iterator[Result]:
    try:
        import ray
    except ImportError:
        raise DefectLensError("the ray engine needs Ray: pip install 'ray==2.60.0'") from None
    started_here = not ray.is_initialized()
    if started_here:
        try:
            if address:
                ray.init(address=address, include_dashboard=False, log_to_driver=False)
            else:
                ray.init(num_cpus=workers or os.cpu_count() or 1, include_dashboard=False, log_to_driver=False)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise DefectLensError(f"cannot start or reach Ray{f' at {address}' if address else ''}: {exc}".splitlines()[0]) from None
    try:
        n_workers = workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
        threads = max(1, (os.cpu_count() or 1) // n_workers) if not address else 1
        # On a cluster the model's bytes go into the object store once, and this process holds the
        # reference until the run ends: a worker restarted after its node died must fetch them
        # again, and bytes passed inline (over 100 KB, so put in the store by Ray) were freed once
        # the first workers had started: a restart then failed with ReferenceCountingAssertionError
        # (seen in the two-node test; Ray's own account: ray-project/ray pull request 53713).
        model = ray.put(Path(model_path).read_bytes()) if address else str(Path(model_path).resolve())
        actor = ray.remote(max_restarts=-1, max_task_retries=-1)(InspectWorker)
        # spread over the nodes of a cluster rather than packed onto the first with free CPUs
        pool = [actor.options(num_cpus=1, scheduling_strategy="SPREAD").remote(model, Path(model_path).suffix, mask_method, threads, runtime)
                for _ in range(n_workers)]
        chunks = [[str(p) for p in paths[i : i + chunk]] for i in range(0, len(paths), chunk)]
        bar = tqdm(total=len(paths), desc=f"inspecting on {n_workers} Ray workers", unit="img", disable=not progress, leave=False)
        pending: dict = {}
        todo = iter(chunks)
        for worker in pool:  # two chunks in flight per worker: the next is ready when one finishes
            for _ in range(2):
                if (c := next(todo, None)) is not None:
                    pending[worker.inspect.remote(c, preview_side)] = worker
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            worker = pending.pop(ready[0])
            if (c := next(todo, None)) is not None:
                pending[worker.inspect.remote(c, preview_side)] = worker
            for source, result in ray.get(ready[0]):
                bar.update(1)
                yield Path(source), result
        bar.close()
    finally:
        if started_here:
            ray.shutdown()
