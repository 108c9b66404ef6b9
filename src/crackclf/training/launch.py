"""Start DDP's other CPU processes when the run starts, not when ``trainer.fit`` does.

Lightning's launcher starts DDP's other processes inside ``trainer.fit``: each re-runs ``python train.py …``, imports
torch, Lightning, timm and MLflow and reads the prepared data again, while rank zero, ready to train, waits for
them (the cold-start table of docs/recipe.md; ``make bench-coldstart``). Started at the beginning of the run
instead, their imports run beside rank zero's, and while rank zero scans and splits the data they wait for its
inventory and split (file locks in :mod:`crackclf.data.inventory` and :mod:`crackclf.data.prepare`) instead of
computing them again. A process started this way is exactly what Lightning would have started (its own command for a
Hydra run, its environment variables); because ``LOCAL_RANK`` is then set, Lightning's ``LightningEnvironment``
treats the processes as created externally (as under ``torchrun``) and starts none itself.

Only for what ``trainer=cpu_ddp`` / ``trainer=ddp trainer.accelerator=cpu`` run on one machine: more than one CPU
process, a fresh run (not ``resume=``), not a Hydra multirun and no outside launcher (torchrun, SLURM). Anything
else keeps Lightning's own launch at ``trainer.fit``, and so does ``CRACKCLF_EARLY_RANKS=0`` in the environment.
"""

from __future__ import annotations

import logging
import os
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from omegaconf import DictConfig

__all__ = ["EarlyRanks", "child_command", "early_rank_count", "free_port", "start_ranks_early"]

log = logging.getLogger(__name__)

#: Environment variables of a launcher that already created the processes (torchrun, SLURM, an early start here).
LAUNCHER_VARIABLES = ("LOCAL_RANK", "RANK", "WORLD_SIZE", "SLURM_NTASKS", "TORCHELASTIC_RUN_ID", "JSM_NAMESPACE_RANK")
#: Lightning strategies that run DDP processes started by its script launcher (not spawn/fork).
SCRIPT_STRATEGIES = ("auto", "ddp", "ddp_find_unused_parameters_true", "ddp_find_unused_parameters_false")


def early_rank_count(cfg: DictConfig) -> int:
    """How many processes to start at the run's start (rank zero included), or 0: leave it to Lightning."""
    if os.environ.get("CRACKCLF_EARLY_RANKS") == "0" or cfg.get("resume") not in (None, ""):
        return 0
    if any(name in os.environ for name in LAUNCHER_VARIABLES):
        return 0
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode == RunMode.MULTIRUN:
        return 0
    trainer = cfg.get("trainer") or {}
    strategy, accelerator = trainer.get("strategy", "auto"), trainer.get("accelerator", "auto")
    devices, nodes = trainer.get("devices", 1), trainer.get("num_nodes", 1)
    if not isinstance(strategy, str) or strategy not in SCRIPT_STRATEGIES or nodes != 1:
        return 0
    if not isinstance(devices, int) or devices < 2 or accelerator not in ("cpu", "auto"):
        return 0
    if accelerator == "auto":
        import torch

        if torch.cuda.is_available() or torch.backends.mps.is_available():
            return 0  # Lightning's auto accelerator would choose the GPU: its own launch
    return devices


def child_command(local_rank: int) -> tuple[list[str], str]:
    """The command and folder of DDP process ``local_rank`` of this Hydra run: what Lightning's script launcher runs
    (``lightning_fabric.strategies.launchers.subprocess_script._hydra_subprocess_cmd``: the same script and overrides,
    the same run folder, its own job name, no second ``.hydra/`` folder), built here because importing Lightning
    takes seconds that the other process would otherwise wait before it starts (tests/unit/test_launch.py checks the
    two commands are the same)."""
    import sys

    from hydra.core.hydra_config import HydraConfig
    from hydra.utils import get_original_cwd, to_absolute_path

    import __main__

    spec = getattr(__main__, "__spec__", None)
    command = [sys.executable, to_absolute_path(sys.argv[0])] if spec is None else [sys.executable, "-m", spec.name]
    command += sys.argv[1:]
    command += [f'hydra.run.dir="{HydraConfig.get().run.dir}"', f"hydra.job.name=train_ddp_process_{local_rank}",
                "hydra.output_subdir=null"]
    return command, get_original_cwd()


def free_port() -> int:
    """A free TCP port on this machine for DDP's rendezvous (``STANDALONE_PORT`` when set, as Lightning does)."""
    import socket

    if "STANDALONE_PORT" in os.environ:
        return int(os.environ["STANDALONE_PORT"])
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("", 0))
        return probe.getsockname()[1]


class EarlyRanks:
    """DDP's other processes, started by :func:`start_ranks_early`; :meth:`attach` hands them to the trainer."""

    def __init__(self, processes: list[subprocess.Popen]) -> None:
        self.processes = processes
        #: Set when rank zero ends them itself: the observer then stops watching (a kill here is not a failure).
        self.ending = threading.Event()

    def attach(self, trainer: Any) -> None:
        """Let the trainer's launcher signal these processes as its own: Lightning forwards SIGTERM to them and
        kills them after a Ctrl-C in rank zero, as it does for the processes it starts. And when rank zero's
        training stops on an exception (a Ctrl-C reaches every rank), the observer stands down first: the other
        ranks then end by themselves, and rank zero must finish saving its checkpoint, not be killed for it."""
        if not self.processes:
            return
        launcher = getattr(trainer.strategy, "launcher", None)
        if launcher is not None and hasattr(launcher, "procs"):
            launcher.procs = [_SignalledByLightning(process, self.ending) for process in self.processes]
        import pytorch_lightning as pl

        ending = self.ending

        class _StandDown(pl.Callback):
            def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
                ending.set()

        trainer.callbacks.insert(0, _StandDown())  # before the checkpoint callback's save on the exception

    def kill(self) -> None:
        """Kill the processes still running (rank zero failed: they would wait for it in a collective)."""
        import signal

        self.ending.set()
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGKILL)
        for process in self.processes:
            process.wait()

    def wait(self, timeout: float = 120.0) -> None:
        """Wait for the processes to end after rank zero's run; kill one that outlives ``timeout`` seconds."""
        self.ending.set()
        for process in self.processes:
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("DDP process %d did not end %.0f s after rank zero's run: killed", process.pid, timeout)
                self.kill()


class _SignalledByLightning:
    """One of the processes as the trainer's launcher holds it: a signal Lightning sends it (SIGTERM passed on, the
    kill after a Ctrl-C) means rank zero is stopping the run itself, so the observer stands down first."""

    def __init__(self, process: subprocess.Popen, ending: threading.Event) -> None:
        self._process, self._ending = process, ending

    def send_signal(self, signum: int) -> None:
        self._ending.set()
        self._process.send_signal(signum)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._process, name)


def _observe(processes: list[subprocess.Popen], ending: threading.Event, period: float = 2.0) -> None:
    """When one of DDP's other processes fails, end the whole run: rank zero would otherwise wait for it forever in
    its next collective (as Lightning's own observer does for the processes it starts). Rank zero's worker processes
    (inventory, image cache) go first: killed with it, they would be left running and holding its output open."""
    import multiprocessing
    import signal

    while not ending.wait(period):
        codes = [process.poll() for process in processes]
        if all(code == 0 for code in codes):
            return
        failed = next((p for p, code in zip(processes, codes, strict=True) if code not in (None, 0)), None)
        if failed is not None:
            log.error("DDP process %d ended with status %s: stopping the run (its messages are above)",
                      failed.pid, failed.returncode)
            for process in [*processes, *multiprocessing.active_children()]:
                if process.pid != failed.pid:
                    process.kill()
            os.kill(os.getpid(), signal.SIGKILL)  # rank zero may be inside a collective: nothing milder ends it
            return


@contextmanager
def start_ranks_early(cfg: DictConfig) -> Iterator[EarlyRanks]:
    """``with start_ranks_early(cfg) as ranks:`` around the run: start DDP's other processes now where
    :func:`early_rank_count` allows (else none), kill them when rank zero's run fails, wait for them when it ends."""
    count = early_rank_count(cfg)
    if count < 2:
        yield EarlyRanks([])
        return
    launched = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "NODE_RANK": "0",
                "LOCAL_RANK": "0", "WORLD_SIZE": str(count)}
    before = {name: os.environ.get(name) for name in launched}
    os.environ.update(launched)
    processes = []
    for local_rank in range(1, count):
        command, cwd = child_command(local_rank)
        processes.append(subprocess.Popen(command, env={**os.environ, "LOCAL_RANK": str(local_rank)}, cwd=cwd))
    ranks = EarlyRanks(processes)
    threading.Thread(target=_observe, args=(processes, ranks.ending), name="crackclf-rank-observer",
                     daemon=True).start()
    log.info("started %d more DDP process(es) before data preparation", count - 1)
    try:
        yield ranks
    except BaseException:
        ranks.kill()
        raise
    else:
        ranks.wait()
    finally:  # a later run in this interpreter must not look launched from outside
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
