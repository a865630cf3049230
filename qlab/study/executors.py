"""Where a campaign's trials run: one interface, three executors.

- `InlineExecutor`: here, one trial after another (the kernel lab's default: one lab at a time).
- `PoolExecutor`: worker processes on this machine (the simulator's default: one per core).
- `DaskExecutor`: a dask.distributed cluster, given a scheduler's address or `local` for a
  LocalCluster on this machine (with its dashboard).

An executor only runs trials and hands back their records, in the order they finish; the driver
(`campaign.run`) keeps the results store. What a trial needs besides its TrialSpec travels with it
as a `TrialKit` (the lab's certificates and the simulator's calibration, read once by the driver),
so a worker on another machine runs exactly the driver's trials and needs no shared filesystem.
"""

from __future__ import annotations

import hashlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from qlab import __version__
from qlab.experiment.record import TrialResult, TrialSpec, error_text
from qlab.nat.spec import cell_expected

if TYPE_CHECKING:
    from distributed import Client, LocalCluster

    from qlab.backends.base import Backend

NETNS_RESOURCE = "netns"  # what a Dask worker declares (`--resources netns=1`) to take kernel-lab trials
WORKER_WAIT_S = 10.0  # how long a cluster may take to show its first worker
CAPABLE_CHECK_S = 5.0  # how often a waiting driver checks that some worker can still run its trials


class ExecutorError(RuntimeError, ValueError):
    """The executor cannot run this campaign's trials (no cluster, no worker that can)."""


@dataclass(frozen=True)
class TrialKit:
    """The driver's certificates (file name, bytes) and simulator calibration, for every trial."""

    certs: tuple[tuple[str, bytes], ...]
    calibration: dict[str, Any]
    code: str = ""  # the driver's qlab (code_digest): a worker running other code would give other records

    @classmethod
    def from_here(cls, backend: str) -> TrialKit:
        from qlab.backends.sim.calibrate import active
        from qlab.certs import default_certs

        folder = Path(default_certs())
        files = tuple((p.name, p.read_bytes()) for p in sorted(folder.iterdir()) if p.is_file())
        return cls(certs=files, calibration=active().to_dict() if backend == "sim" else {}, code=code_digest())

    def certs_dir(self) -> str:
        return _materialise(self.certs)

    def backend(self, name: str) -> Backend[Any] | None:
        """The simulator with the driver's calibration; None: the backend's default instance."""
        if name != "sim":
            return None
        from qlab.backends.sim.backend import SimBackend
        from qlab.backends.sim.cost import Calibration

        return SimBackend(Calibration.from_dict(self.calibration))


@cache
def code_digest() -> str:
    """A digest of this process's qlab sources, Python minor version and aioquic version: equal on
    two machines when they give the same sim records (the same seed on Python 3.11 and 3.12 does not:
    asyncio orders some events differently)."""
    import aioquic

    package = Path(__file__).resolve().parents[1]
    h = hashlib.sha256(f"python {sys.version_info[0]}.{sys.version_info[1]}, aioquic {aioquic.__version__}\0".encode())
    for p in sorted(package.rglob("*.py")):
        h.update(p.relative_to(package).as_posix().encode() + b"\0" + p.read_bytes())
    return h.hexdigest()[:16]


@cache
def _materialise(certs: tuple[tuple[str, bytes], ...]) -> str:
    """The kit's certificates as a folder of this user's cache, named by their digest (so a copy
    already there is the same), written once per process."""
    from qlab.certs import cache_dir, copy_dir

    folder = cache_dir() / f"kit-certs-{hashlib.sha256(repr(certs).encode()).hexdigest()[:16]}"
    if not all((folder / name).is_file() for name, _ in certs):
        copy_dir(folder, dict(certs))
    return str(folder)


def run_one(spec: TrialSpec, kit: TrialKit) -> dict:
    """One trial, in whichever process runs it; a trial that raises is a `failed` record."""
    from qlab.experiment.trial import run_trial

    logging.disable(logging.CRITICAL)  # the record says what happened; logs (asyncio's at teardown too) would interleave
    if kit.code and kit.code != code_digest():
        raise ExecutorError(f"this worker runs other qlab code ({code_digest()}) than the driver ({kit.code}); "
                            "install the driver's qlab, Python minor version and aioquic on every worker")
    try:
        return run_trial(spec, certs_dir=kit.certs_dir(), backend=kit.backend(spec.backend)).to_dict()
    except Exception as exc:  # a failing trial is a record, not a hole
        return failed_record(spec, exc)


def failed_record(spec: TrialSpec, exc: BaseException) -> dict:
    rec: dict[str, Any] = {f: None for f in TrialResult.__dataclass_fields__}
    rec.update(
        trial_id=spec.trial_id, campaign_id=spec.campaign_id, backend=spec.backend, scenario=spec.scenario,
        agent_nat=spec.agent_nat, connector_nat=spec.connector_nat, profile=spec.profile, seed=spec.seed,
        qlab_version=__version__, started_at=time.time(), duration_s=0.0,
        expected=cell_expected(spec.agent_nat, spec.connector_nat, ipv6_both=bool(spec.agent_ipv6 and spec.connector_ipv6)),
        outcome="failed",
        reason=f"the trial raised {type(exc).__name__}", as_expected=False, direct_verified=False,
        agent_nat_detected="UNKNOWN", connector_nat_detected="UNKNOWN", agent_candidates=[],
        connector_candidates=[], agent_probes=0, connector_probes=0, predicted_ports=[], working_pair="",
        rtt_relay_n=0, rtt_direct_n=0, relay_bytes_out=0, relay_bytes_in=0, direct_bytes_out=0,
        direct_bytes_in=0, verify_sent=0, verify_received=0, path_events=[], measured_with="",
        error=error_text(exc), extra={}, rtt_relay_sent=0, rtt_relay_received=0,
        rtt_direct_sent=0, rtt_direct_received=0, echo_direct_answered_on_relay=0,
        echo_relay_answered_on_direct=0, punch="none", mode=spec.mode, punch_delay=spec.punch_delay,
    )
    return rec


class Executor(Protocol):
    """Runs trials and yields each one's record as it finishes (any order). Closing the generator
    early cancels what has not run; `close()` releases what the executor started."""

    @property
    def where(self) -> str:
        """For people: the cluster and its dashboard ("" for this machine)."""

    def check(self, backend: str) -> None:
        """Raise ExecutorError, before anything is written, if no worker can run this backend's trials."""

    def run(self, specs: Sequence[TrialSpec], kit: TrialKit) -> Iterator[dict]: ...

    def close(self) -> None: ...


class InlineExecutor:
    where = ""  # this machine

    def check(self, backend: str) -> None:
        pass

    def run(self, specs: Sequence[TrialSpec], kit: TrialKit) -> Iterator[dict]:
        for spec in specs:
            yield run_one(spec, kit)

    def close(self) -> None:
        pass


def _ignore_sigint() -> None:
    """Ctrl-C is the driver's to handle (it keeps what finished); a worker interrupted mid-trial
    only prints warnings about its half-closed event loop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class PoolExecutor:
    """Worker processes on this machine; two trials per worker are queued at a time, so an
    interrupted campaign leaves little half-run."""

    where = ""

    def __init__(self, workers: int) -> None:
        self.pool = ProcessPoolExecutor(workers, initializer=_ignore_sigint)
        self.window = workers * 2

    def check(self, backend: str) -> None:
        pass

    def run(self, specs: Sequence[TrialSpec], kit: TrialKit) -> Iterator[dict]:
        queue = list(reversed(specs))
        pending: set[Future[dict]] = set()
        try:
            while queue or pending:
                while queue and len(pending) < self.window:
                    pending.add(self.pool.submit(run_one, queue.pop(), kit))
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                for f in finished:
                    yield f.result()
        finally:
            for f in pending:
                f.cancel()

    def close(self) -> None:
        self.pool.shutdown(cancel_futures=True)


class DaskExecutor:
    """Trials as tasks of a dask.distributed cluster. A worker that dies mid-trial costs nothing but
    time: the scheduler runs its tasks elsewhere, and a task yields one result, so no trial is
    recorded twice. Kernel-lab trials ask for the `netns` resource, so only workers started with
    `--resources netns=1` (as root, on a host that has the lab) take them."""

    def __init__(self, cluster: str | Client, *, workers: int | None = None) -> None:
        from distributed import Client

        self.cluster: LocalCluster | None = None
        self.owns_client = not isinstance(cluster, Client)
        if isinstance(cluster, Client):
            self.client = cluster
        elif cluster == "local":
            self.cluster = _local_cluster(workers)
            self.client = Client(self.cluster)
        else:
            if workers is not None:
                raise ExecutorError("--workers sizes the local pool or `--cluster local`; a running cluster "
                                    "has the workers its `dask worker` processes give it")
            try:
                self.client = Client(cluster, timeout=WORKER_WAIT_S)
            except (OSError, TimeoutError, ValueError) as exc:
                raise ExecutorError(f"cannot reach the Dask scheduler at {cluster}: {exc}") from None

    @property
    def where(self) -> str:
        link = self.client.dashboard_link if self.client.scheduler_info().get("services", {}).get("dashboard") else ""
        return f"the Dask cluster {self.client.scheduler.address}" + (f" (dashboard {link})" if link else "")

    def check(self, backend: str) -> None:
        self._require_capable(_needs(backend), grace=WORKER_WAIT_S)
        other = {addr: code for addr, code in self.client.run(code_digest).items() if code != code_digest()}
        if other:
            addr, code = next(iter(other.items()))
            raise ExecutorError(f"{len(other)} worker(s) of the Dask cluster run other qlab code than this driver "
                                f"(e.g. {addr}: {code}, here {code_digest()}); install the same qlab, Python minor version and "
                                f"aioquic on every worker")

    def run(self, specs: Sequence[TrialSpec], kit: TrialKit) -> Iterator[dict]:
        from distributed import wait as dask_wait

        need = _needs(specs[0].backend) if specs else {}
        token = os.urandom(4).hex()  # a resumed campaign's tasks are new tasks, whatever ran before
        futures = {self.client.submit(run_one, s, kit, key=f"qlab-{s.campaign_id}-{s.trial_id}-{token}",
                                      pure=False, resources=need or None): s for s in specs}
        pending = set(futures)
        try:
            while pending:
                try:
                    done, pending = dask_wait(pending, timeout=CAPABLE_CHECK_S, return_when="FIRST_COMPLETED")
                except TimeoutError:
                    self._require_capable(need, grace=0)
                    continue
                for f in done:
                    rec = _result(f, futures.pop(f))
                    f.release()  # else the scheduler keeps the record and recomputes it if that worker dies
                    yield rec
        finally:
            if pending:
                self.client.cancel(list(pending))

    def _require_capable(self, need: dict[str, int], grace: float) -> None:
        """Fail fast, with one line, when no worker of the cluster can take these trials (waiting up
        to `grace` only while the cluster has no worker at all: one may be starting)."""
        deadline = time.monotonic() + grace
        while True:
            workers = list(self.client.scheduler_info(n_workers=-1).get("workers", {}).values())
            if any(all(w.get("resources", {}).get(k, 0) >= v for k, v in need.items()) for w in workers):
                return
            if workers or time.monotonic() >= deadline:
                break
            time.sleep(0.2)
        if need:
            raise ExecutorError(
                f"no worker of the Dask cluster declares the {NETNS_RESOURCE} resource, so none may run kernel-lab "
                f"trials; start one as root on a host with the lab: dask worker ADDRESS --resources {NETNS_RESOURCE}=1")
        raise ExecutorError("the Dask cluster has no worker; start one: dask worker ADDRESS")

    def close(self) -> None:
        if self.owns_client:
            self.client.close()
        if self.cluster is not None:
            self.cluster.close()


def _needs(backend: str) -> dict[str, int]:
    return {NETNS_RESOURCE: 1} if backend == "netns" else {}


def _result(future: Any, spec: TrialSpec) -> dict:
    try:
        return dict(future.result())
    except ExecutorError:  # the worker cannot run the campaign's trials at all: stop, record nothing
        raise
    except Exception as exc:  # e.g. KilledWorker: the trial took down every worker that tried it
        return failed_record(spec, exc)


def _local_cluster(workers: int | None) -> LocalCluster:
    """A LocalCluster on loopback, one single-threaded worker process per core; its workers declare
    the netns resource when this host can run the kernel lab."""
    from distributed import LocalCluster

    from qlab.backends.netns.lab import LabUnavailable, check_requirements

    try:
        check_requirements()
        resources = {NETNS_RESOURCE: 1}
    except LabUnavailable:
        resources = {}
    logging.getLogger("distributed").setLevel(logging.WARNING)  # its start-up chatter is not the campaign's
    with _sigint_ignored_by_children():
        return LocalCluster(n_workers=workers or os.cpu_count() or 1, threads_per_worker=1, processes=True,
                            host="127.0.0.1", dashboard_address="127.0.0.1:8787", resources=resources)


@contextmanager
def _sigint_ignored_by_children() -> Iterator[None]:
    """Processes started inside inherit an ignored SIGINT: Ctrl-C is the driver's (it keeps what
    finished and closes the cluster), not a traceback from every worker."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, before)


def make_executor(backend_parallel: bool, *, workers: int | None = None,
                  cluster: str | Client | None = None) -> Executor:
    """The executor a campaign asked for: a Dask cluster if given, else worker processes on this
    machine (one per core where the backend runs trials in parallel, `workers` if given), else here."""
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise ValueError(f"workers must be a whole number of at least 1, got {workers!r}")
    if cluster is not None:
        return DaskExecutor(cluster, workers=workers)
    n = workers or ((os.cpu_count() or 1) if backend_parallel else 1)
    return PoolExecutor(n) if n > 1 else InlineExecutor()
