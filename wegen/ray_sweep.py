"""Diversity sweeps on a Ray cluster: one WeGen engine per worker (a Ray actor), batches spread over them. EXTENSION.

Ray is an optional extra (`pip install ray`, or the project's `ray` extra): it is imported only inside
RayExecutor, and this module only by `python -m wegen sweep --ray [ADDRESS]`.

  * ADDRESS given ("auto", "HOST:6379", "ray://HOST:10001"): join that running cluster. With GPUs in
    the cluster, one actor per GPU (num_gpus=1, device cuda) unless `workers` says otherwise; without,
    CPU actors. The checkpoint path must exist on every worker (shared storage); the `wegen` package
    travels with the job (runtime_env py_modules), torch & co. must be installed on the workers.
  * no ADDRESS: a local Ray instance (all this machine's CPUs, no dashboard), shut down afterwards.

Planning, batching, writing, resuming and sweep.json are wegen.sweep's (run_sweep): this executor only
decides where each batch runs. ActorPool.map hands batches to free actors and yields results in order,
so a batch's images are written as soon as it and every batch before it are finished, and a rerun with
--resume skips them. Every batch calls the same wegen.sweep.encode_batch / decode_batch as a local
sweep; CPU actors use the driver's torch thread count, so on the same machine a Ray sweep gives the
same images as a plain one bit for bit.
"""
from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

LOCAL_OBJECT_STORE = 512 * 2 ** 20  # a local instance needs little: one batch of images at a time


def import_ray():
    try:
        import ray
    except ImportError as e:
        raise ImportError("sweep --ray needs Ray, an optional extra: pip install 'ray>=2.9' "
                          "(or pip install '.[ray]' in the pack folder)") from e
    return ray


class EngineActor:
    """Body of one Ray actor: a WeGen engine and the batch calls of wegen.sweep."""

    def __init__(self, checkpoint: str, dtype: str, device: str, offload: str, threads: int | None, **engine_kw):
        self.threads = threads
        self._set_threads()
        from .engine import WeGenEngine

        self.engine = WeGenEngine.load(checkpoint, dtype=dtype, device=device, offload=offload, **engine_kw)

    def _set_threads(self):
        """OpenMP's thread count is per calling thread, and Ray may run methods on another thread than
        __init__: set it on every call (with OMP_NUM_THREADS in the actor's environment as well)."""
        if self.threads:
            import torch

            torch.set_num_threads(self.threads)

    def info(self) -> dict:
        from .sweep import engine_info

        self._set_threads()
        return engine_info(self.engine)

    def rewrite(self, prompt: str, n: int, kwargs: dict):
        from .rewrite import rewrite_prompt

        self._set_threads()
        return rewrite_prompt(self.engine, prompt, n, **kwargs)

    def encode(self, prompts, seeds, settings):
        from .sweep import encode_batch

        self._set_threads()
        return encode_batch(self.engine, prompts, seeds, settings)

    def decode(self, features, seeds, settings):
        from .sweep import decode_batch

        self._set_threads()
        return decode_batch(self.engine, features, seeds, settings)


class RayExecutor:
    """Executor for wegen.sweep.run_sweep backed by Ray actors. Use as a context manager (closes Ray)."""

    def __init__(self, checkpoint: str, address: str | None = None, *, dtype: str = "auto", device: str | None = None,
                 offload: str = "none", workers: int | None = None, threads: int | None = None, **engine_kw):
        """engine_kw: preset / weight_dtype, passed to every actor's WeGenEngine.load."""
        if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
            raise ValueError(f"workers (Ray actors) must be a positive integer, got {workers!r}")
        ray = import_ray()
        import torch

        self.ray = ray
        self._started = not ray.is_initialized()
        if self._started:
            self._init(address)
        gpus = int(ray.cluster_resources().get("GPU", 0))
        device = device or ("cuda" if gpus else "cpu")
        on_gpu = device.startswith("cuda")
        if on_gpu and not gpus:
            self.close()
            raise ValueError(f"device {device!r} asked for, but the Ray cluster has no GPU")
        count = workers or (gpus if on_gpu else 1)
        if threads is None and not on_gpu:
            threads = torch.get_num_threads()  # same kernels' reductions as a plain sweep here
        options = {"num_gpus": 1, "num_cpus": 1} if on_gpu else {"num_cpus": 1}
        if threads:
            options["runtime_env"] = {"env_vars": {"OMP_NUM_THREADS": str(threads)}}
        remote = ray.remote(**options)(EngineActor)
        path = os.path.abspath(checkpoint)
        self.actors = [remote.remote(path, dtype, device, offload, threads, **engine_kw) for _ in range(count)]
        try:
            infos = ray.get([a.info.remote() for a in self.actors])
        except Exception as e:  # RayActorError / RayTaskError wrap the worker's exception
            self.close()
            raise ValueError(f"Ray workers could not load checkpoint {path}: {_last_line(e)}") from e
        self.info = infos[0]
        log.info("Ray sweep: %d actor(s) on %s, %s", count, device, self.info["dtype"])

    def _init(self, address):
        env = {"py_modules": [os.path.dirname(os.path.abspath(__file__))]}  # the wegen package
        try:
            if address:
                self.ray.init(address=address, runtime_env=env, log_to_driver=False)
            else:
                self.ray.init(num_cpus=os.cpu_count(), include_dashboard=False, runtime_env=env,
                              object_store_memory=LOCAL_OBJECT_STORE, log_to_driver=False)
        except (ConnectionError, RuntimeError, ValueError) as e:
            where = f"the Ray cluster at {address}" if address else "a local Ray instance"
            raise ValueError(f"cannot start or join {where}: {_last_line(e)}") from e

    def rewrite(self, prompt: str, n: int, **kwargs):
        return self._get(self.actors[0].rewrite.remote(prompt, n, kwargs))

    def encode(self, jobs, settings):
        return self._map(_encode_call, [(p, s, settings) for p, s in jobs])

    def decode(self, jobs, settings):
        return self._map(_decode_call, [(f, s, settings) for f, s in jobs])

    def _map(self, call, jobs):
        from ray.util import ActorPool

        results = iter(ActorPool(self.actors).map(call, jobs))  # in job order
        while True:
            try:
                result = next(results)
            except StopIteration:
                return
            except self.ray.exceptions.RayTaskError as e:
                raise _worker_error(e) from None
            yield result

    def _get(self, ref):
        try:
            return self.ray.get(ref)
        except self.ray.exceptions.RayTaskError as e:
            raise _worker_error(e) from None

    def close(self):
        for a in getattr(self, "actors", []):
            self.ray.kill(a)
        self.actors = []
        if self._started and self.ray.is_initialized():
            self.ray.shutdown()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _encode_call(actor, job):
    return actor.encode.remote(*job)


def _decode_call(actor, job):
    return actor.decode.remote(*job)


def _worker_error(e: BaseException) -> BaseException:
    """A worker's ValueError/FileNotFoundError comes back as itself (a clear CLI message), others as is."""
    cause = getattr(e, "cause", None)
    return cause if isinstance(cause, (ValueError, FileNotFoundError)) else e


def _last_line(e: BaseException) -> str:
    lines = [line for line in str(e).strip().splitlines() if line.strip()]
    return lines[-1] if lines else type(e).__name__
