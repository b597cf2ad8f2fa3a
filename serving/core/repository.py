"""The model repository on disk: `<root>/<name>/<version>/model.onnx`.

Discovers models and versions, loads the newest `max_versions` of each off the event loop,
refuses files that fail to load or warm up (remembering them until the file changes), and
unloads versions that fall out of the window or vanish, once their in-flight calls drain.
A version that fails never replaces one that serves: routing always picks the newest READY.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

import numpy as np
import numpy.typing as npt

from serving.config import DEFAULTS
from serving.core.batching import Batcher, Observer, run_unbatched
from serving.core.explanations import CamGraph
from serving.core.inspection import FeatureMapSession, read_filters
from serving.core.run_process import RemoteModel, RunProcess
from serving.core.runtime import ModelLoadError, ModelRuntime, RuntimeOptions
from serving.core.summary import Layer, ParameterSummary, summarize
from serving.errors import FailedPrecondition, NotFound, Unavailable

log = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
F32 = npt.NDArray[np.float32]


class State(Enum):
    LOADING = "LOADING"
    READY = "READY"
    FAILED = "FAILED"
    UNLOADED = "UNLOADED"


@dataclass(frozen=True)
class BatchingOptions:
    enabled: bool = DEFAULTS.batching
    max_batch_size: int = DEFAULTS.max_batch_size
    max_delay_s: float = DEFAULTS.max_queue_delay_ms / 1000
    max_runs: int = 1  # runs of one model at once
    inline: bool = False  # runs on the event loop's thread (one core: a worker could not help)


@dataclass
class ServedVersion:
    """One loaded version: its runtime, and the single path requests take to it."""

    name: str
    version: int
    runtime: ModelRuntime
    batcher: Batcher | None
    executor: Executor
    observer: Observer | None = None
    inline: bool = False  # unbatched runs on the event loop's thread
    remote: RemoteModel | None = None  # this version in the run process, when there is one
    loaded_at: float = field(default_factory=time.time)
    inflight: int = 0
    _idle: asyncio.Event = field(default_factory=asyncio.Event)
    _summary: ParameterSummary | None = None
    _maps: FeatureMapSession | None = None  # made on the first feature-map call, dropped at unload
    _maps_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    _cam: CamGraph | FailedPrecondition | None = None  # Grad-CAM's chain, or why there is none

    async def parameter_summary(self) -> ParameterSummary:
        """The per-layer summary of the graph this version serves, read once (off the loop)."""
        if self._summary is None:
            self._summary = await asyncio.to_thread(summarize, self.runtime.path)
        return self._summary

    async def feature_map_session(self) -> FeatureMapSession:
        """The second session that exposes the layers' activations, made once (off the loop)."""
        async with self._maps_lock:  # concurrent first calls make one session, not several
            if self._maps is None:
                summary = await self.parameter_summary()
                self._maps = await asyncio.to_thread(FeatureMapSession, self.runtime.path, summary)
        return self._maps

    async def cam_graph(self) -> CamGraph:
        """The chain after the last convolution that Grad-CAM's closed form needs, read once;
        FailedPrecondition (each time) when the graph has none."""
        if self._cam is None:
            summary = await self.parameter_summary()
            try:
                self._cam = await asyncio.to_thread(CamGraph.read, self.runtime.path, summary)
            except FailedPrecondition as exc:
                self._cam = exc
        if isinstance(self._cam, FailedPrecondition):
            raise FailedPrecondition(self._cam.message)
        return self._cam

    @property
    def has_feature_map_session(self) -> bool:
        return self._maps is not None

    async def filters(self, layer: Layer) -> tuple[F32, F32]:
        """A convolution layer's kernels [K, K, in, out] and biases, read from the file."""
        return await asyncio.to_thread(read_filters, self.runtime.path, layer)

    async def infer(self, x: F32) -> F32:
        self.inflight += 1
        self._idle.clear()
        try:
            if self.batcher is not None:
                return await self.batcher.submit(x)
            return await run_unbatched(
                self.runtime.run, self.executor, x, self.observer, inline=self.inline
            )
        finally:
            self.inflight -= 1
            if self.inflight == 0:
                self._idle.set()

    async def drain_and_close(self, timeout: float) -> None:
        if self.inflight:
            try:
                await asyncio.wait_for(self._idle.wait(), timeout)
            except TimeoutError:
                log.warning(
                    "%s v%d: %d calls still running at unload",
                    self.name,
                    self.version,
                    self.inflight,
                )
        if self.batcher is not None:
            await self.batcher.close()
        if self.remote is not None:
            self.remote.close()
        self._maps = None


@dataclass
class VersionStatus:
    version: int
    state: State
    reason: str = ""
    signature: tuple[float, int] = (0.0, 0)  # mtime, size of the file this status is about


StateListener = Callable[[str, int, State, float], None]


class ModelRepository:
    def __init__(
        self,
        root: Path,
        *,
        runtime_options: RuntimeOptions,
        batching: BatchingOptions,
        executor: Executor,
        max_versions: int = DEFAULTS.max_versions,
        observer_for: Callable[[str, int, str], Observer] | None = None,
        on_state: StateListener | None = None,
        runs: RunProcess | None = None,
        pinned: Callable[[str], Sequence[int]] | None = None,
    ) -> None:
        self.root = root
        self.runs = runs  # batched runs go there when set (this process's threads otherwise)
        self.runtime_options = runtime_options
        self.batching = batching
        self.executor = executor
        self.max_versions = max_versions
        self._observer_for = observer_for
        self._on_state = on_state
        # Versions a model's rollout policy names: loaded first, and kept whatever max_versions
        # says.
        self._pinned = pinned
        self._served: dict[str, dict[int, ServedVersion]] = {}
        self._status: dict[str, dict[int, VersionStatus]] = {}
        self._scan_lock = asyncio.Lock()
        self._background: set[asyncio.Task[None]] = set()
        self.scanned_once = False

    # ------------------------------------------------------------ routing

    def model_names(self) -> list[str]:
        return sorted(self._status)

    def get(self, name: str, version: int = 0) -> ServedVersion:
        """The version to run: the newest READY one when `version` is 0."""
        if name not in self._status:
            if not self.scanned_once:  # listening already, the folder not read yet: retry soon
                raise Unavailable(f"model {name!r}: the model repository is still being read")
            known = ", ".join(self.model_names()) or "none"
            raise NotFound(f"model {name!r} not found; available models: {known}")
        served = self._served.get(name, {})
        if version == 0:
            if served:
                return served[max(served)]
            raise Unavailable(f"model {name!r} has no version ready yet ({self._describe(name)})")
        if version in served:
            return served[version]
        status = self._status[name].get(version)
        if status is not None and status.state is State.LOADING:
            raise Unavailable(f"model {name!r} version {version} is still loading")
        ready = ", ".join(str(v) for v in sorted(served)) or "none"
        raise NotFound(
            f"model {name!r} has no version {version} loaded; ready versions: {ready}"
            + (
                f" (version {version} {status.state.value.lower()}: {status.reason})"
                if status
                else ""
            )
        )

    def ready_versions(self, name: str) -> list[int]:
        return sorted(self._served.get(name, {}))

    def statuses(self) -> dict[str, list[VersionStatus]]:
        return {n: [s[v] for v in sorted(s)] for n, s in sorted(self._status.items())}

    def is_ready(self, name: str, version: int = 0) -> bool:
        served = self._served.get(name, {})
        return bool(served) if version == 0 else version in served

    def _describe(self, name: str) -> str:
        parts = [f"v{s.version} {s.state.value.lower()}" for s in self.statuses().get(name, [])]
        return ", ".join(parts) or "no versions on disk"

    # ------------------------------------------------------------ scanning

    def _discover(self) -> dict[str, dict[int, Path] | None] | None:
        """Versions on disk per model folder; None for a folder that cannot be read (its model
        stays as it is), or for the whole when the repository itself cannot be read."""
        try:
            model_dirs = [
                p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")
            ]
        except OSError as exc:
            log.error("model repository %s unreadable (%s); keeping what is loaded", self.root, exc)
            return None
        found: dict[str, dict[int, Path] | None] = {}
        for model_dir in sorted(model_dirs):
            versions: dict[int, Path] = {}
            try:
                entries = list(model_dir.iterdir())
            except OSError as exc:
                log.error("model folder %s unreadable (%s); keeping what is loaded", model_dir, exc)
                found[model_dir.name] = None
                continue
            for entry in entries:
                if entry.name.isdigit() and int(entry.name) > 0 and (entry / MODEL_FILE).is_file():
                    versions[int(entry.name)] = entry / MODEL_FILE
            if versions:
                found[model_dir.name] = versions
        return found

    async def scan(self) -> None:
        """Bring the loaded set in line with the disk. Safe to call at any time."""
        async with self._scan_lock:
            found = await asyncio.to_thread(self._discover)
            if found is None:
                return
            for name in set(self._status) - set(found):
                for version in list(self._status[name]):
                    self._forget(name, version)
                del self._status[name]
                self._served.pop(name, None)
            for name, versions in found.items():
                if versions is not None:
                    await self._sync_model(name, versions)
            self.scanned_once = True

    async def _sync_model(self, name: str, versions: dict[int, Path]) -> None:
        statuses = self._status.setdefault(name, {})
        served = self._served.setdefault(name, {})
        for version in [v for v in statuses if v not in versions]:
            self._forget(name, version)
            del statuses[version]
        signatures = {v: _signature(p) for v, p in versions.items()}
        # A version that failed stays refused until its file changes.
        loadable = [
            v
            for v in sorted(versions, reverse=True)
            if not (
                statuses.get(v) is not None
                and statuses[v].state is State.FAILED
                and statuses[v].signature == signatures[v]
            )
        ]
        pinned = list(self._pinned(name)) if self._pinned is not None else []
        candidates = loadable[: self.max_versions] + [
            v for v in loadable[self.max_versions :] if v in pinned
        ]
        # Pinned versions first, in their order: the version a policy makes serve is ready
        # before the others.
        first = {v: i for i, v in enumerate(pinned)}
        for version in sorted(candidates, key=lambda v: (first.get(v, len(first)), -v)):
            if version not in served:
                await self._load(name, version, versions[version], signatures[version])
        keep = set(candidates)
        for version in list(served):
            if version not in keep and len(served) > 1 and max(served) > version:
                self._unload(name, version, f"outside the newest {self.max_versions} versions")

    async def _load(
        self, name: str, version: int, path: Path, signature: tuple[float, int]
    ) -> None:
        status = VersionStatus(version, State.LOADING, signature=signature)
        self._status[name][version] = status
        self._notify(name, version, State.LOADING, 0.0)
        started = time.perf_counter()
        remote = None
        options = self.runtime_options
        if self.runs is not None and self.batching.enabled:
            remote = asyncio.ensure_future(self._open_remote(self.runs, path))
            # Batches run over there: warmed up here for what stays here (a run cheaper than the
            # hand-off, a single image), the arena is not held for batches that never come.
            options = dataclasses.replace(
                options, warmup_batch_sizes=options.warmup_batch_sizes[:1]
            )
        try:
            runtime = await asyncio.to_thread(ModelRuntime, path, options)
        except Exception as exc:  # a ModelLoadError or anything else: a refusal, never a crash
            if remote is not None and isinstance(opened := await remote, RemoteModel):
                opened.close()
            seconds = time.perf_counter() - started
            status.state = State.FAILED
            expected = isinstance(exc, ModelLoadError)
            status.reason = str(exc) if expected else f"{type(exc).__name__}: {exc}"
            log.error(
                "model %s v%d refused after %.2fs: %s",
                name,
                version,
                seconds,
                status.reason,
                exc_info=not expected,
                extra=_event("model_refused", name, version, seconds, reason=status.reason),
            )
            self._notify(name, version, State.FAILED, seconds)
            return
        observer = (
            self._observer_for(name, version, runtime.provider) if self._observer_for else None
        )
        batching = self.batching
        remote_model = await remote if remote is not None else None
        if isinstance(remote_model, ModelLoadError):
            log.warning(
                "model %s v%d runs in this process's threads: %s", name, version, remote_model
            )
            remote_model = None
        batcher = None
        if batching.enabled:
            batcher = Batcher(
                runtime.run,
                self.executor,
                max_batch_size=batching.max_batch_size,
                max_delay_s=batching.max_delay_s,
                observer=observer,
                max_runs=batching.max_runs,
                inline=batching.inline,
                remote=remote_model,
            )
        self._served[name][version] = ServedVersion(
            name,
            version,
            runtime,
            batcher,
            self.executor,
            observer,
            batching.inline,
            remote_model,
        )
        status.state, status.reason = State.READY, ""
        log.info(
            "model %s v%d ready in %.2fs on %s (input %s, %d classes, dataset %s; up to %d runs "
            "at once, %s)",
            name,
            version,
            runtime.load_seconds,
            runtime.provider,
            "x".join(map(str, runtime.info.input_shape)),
            runtime.info.num_classes,
            runtime.info.dataset or "?",
            batching.max_runs if batching.enabled else 1,
            "on the event loop's thread"
            if batching.inline
            else "in the run process"
            if remote_model is not None
            else "in worker threads",
            extra=_event(
                "model_ready",
                name,
                version,
                runtime.load_seconds,
                provider=runtime.provider,
                runs=str(batching.max_runs),
            ),
        )
        self._notify(name, version, State.READY, runtime.load_seconds)

    async def _open_remote(self, runs: RunProcess, path: Path) -> RemoteModel | ModelLoadError:
        """The version in the run process too, loaded beside this process's own session; or
        why it cannot be there (it then runs in this process's threads)."""
        try:
            return await asyncio.to_thread(runs.open, path, self.batching.max_runs)
        except ModelLoadError as exc:
            return exc

    def _unload(self, name: str, version: int, reason: str) -> None:
        served = self._served[name].pop(version)
        status = self._status[name].get(version)
        if status is not None:
            status.state, status.reason = State.UNLOADED, reason
        log.info(
            "model %s v%d unloaded: %s",
            name,
            version,
            reason,
            extra=_event("model_unloaded", name, version, reason=reason),
        )
        self._notify(name, version, State.UNLOADED, 0.0)
        task = asyncio.get_running_loop().create_task(served.drain_and_close(timeout=30.0))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _forget(self, name: str, version: int) -> None:
        """A version whose file is gone: unload it if it serves; a refused one stops counting as
        FAILED (metrics and health would otherwise report a failure that no longer exists)."""
        if version in self._served.get(name, {}):
            self._unload(name, version, "removed from the repository")
        elif self._status[name][version].state is State.FAILED:
            log.info(
                "model %s v%d (refused) removed from the repository",
                name,
                version,
                extra=_event("model_forgotten", name, version),
            )
            self._notify(name, version, State.UNLOADED, 0.0)

    def _notify(self, name: str, version: int, state: State, seconds: float) -> None:
        if self._on_state is not None:
            self._on_state(name, version, state, seconds)

    async def close(self, timeout: float = 5.0) -> None:
        for served in self._served.values():
            for version in list(served):
                await served.pop(version).drain_and_close(timeout)
        if self._background:
            await asyncio.wait(self._background, timeout=timeout)


def _event(
    event: str, name: str, version: int, seconds: float | None = None, **fields: str
) -> dict[str, object]:
    """Structured fields of a model event (the JSON log format writes them out)."""
    extra: dict[str, object] = {"event": event, "model": name, "version": version, **fields}
    if seconds is not None:
        extra["seconds"] = round(seconds, 3)
    return extra


def _signature(path: Path) -> tuple[float, int]:
    try:
        st = path.stat()
    except OSError:
        return (0.0, 0)
    return (st.st_mtime, st.st_size)
