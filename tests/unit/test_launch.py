"""DDP's other CPU processes started with the run (crackclf.training.launch): when that applies, and that a process
that fails ends the whole run instead of leaving rank zero waiting."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode

from crackclf.training import launch
from tests.unit.test_configs import compose_train

CPU_DDP = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"]


def count_for(overrides: list[str], mode: RunMode = RunMode.RUN) -> int:
    cfg = compose_train(overrides)
    cfg.hydra.mode = mode
    HydraConfig.instance().set_config(cfg)
    return launch.early_rank_count(cfg)


@pytest.fixture(autouse=True)
def no_launcher(monkeypatch):
    for name in (*launch.LAUNCHER_VARIABLES, "CRACKCLF_EARLY_RANKS"):
        monkeypatch.delenv(name, raising=False)
    yield
    HydraConfig.instance().cfg = None  # count_for's config must not outlive the test


def test_cpu_ddp_runs_start_their_processes_early_and_nothing_else_does(monkeypatch):
    assert count_for(CPU_DDP) == 2
    assert count_for(["trainer=cpu_ddp"]) == min(2, len(os.sched_getaffinity(0)))  # what `make train` runs
    assert count_for([]) == 0  # one process
    assert count_for([*CPU_DDP, "resume=auto"]) == 0  # a resumed run finds its folder first
    assert count_for([*CPU_DDP, "trainer.strategy=ddp_spawn"]) == 0  # not Lightning's script launcher
    assert count_for([*CPU_DDP, "+trainer.num_nodes=2"]) == 0
    assert count_for(CPU_DDP, RunMode.MULTIRUN) == 0  # a sweep's jobs: Lightning's launch
    monkeypatch.setenv("LOCAL_RANK", "1")  # a rank started by a launcher (this one, torchrun) starts nothing
    assert count_for(CPU_DDP) == 0
    monkeypatch.delenv("LOCAL_RANK")
    monkeypatch.setenv("CRACKCLF_EARLY_RANKS", "0")  # the escape hatch
    assert count_for(CPU_DDP) == 0


def observe(processes, ending=None):
    """Run the observer in a thread with rank zero's own kill recorded instead of carried out."""
    killed = []
    ending = ending or threading.Event()
    real_kill = os.kill

    def fake_kill(pid, signum):
        if pid == os.getpid():
            killed.append(signum)
        else:
            real_kill(pid, signum)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(os, "kill", fake_kill)
        watcher = threading.Thread(target=launch._observe, args=(processes, ending, 0.05))
        watcher.start()
        watcher.join(30)
    assert not watcher.is_alive()
    return killed


def test_a_failed_process_ends_rank_zero_its_peers_and_its_workers():
    peer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    failing = subprocess.Popen([sys.executable, "-c", "import time, sys; time.sleep(0.3); sys.exit(3)"])
    worker = multiprocessing.get_context("spawn").Process(target=time.sleep, args=(60,))  # an inventory worker
    worker.start()
    try:
        assert observe([peer, failing]) == [signal.SIGKILL]
        assert peer.wait(10) == -signal.SIGKILL and failing.returncode == 3
        worker.join(10)
        assert worker.exitcode == -signal.SIGKILL
    finally:
        for process in (peer, failing):
            process.kill()
        worker.kill()


def test_processes_that_end_well_or_that_rank_zero_stops_itself_are_no_failure():
    done = subprocess.Popen([sys.executable, "-c", "pass"])
    assert observe([done]) == []
    running = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    ending = threading.Event()
    held = launch._SignalledByLightning(running, ending)  # as the trainer's launcher holds it
    try:
        held.send_signal(signal.SIGKILL)  # Lightning kills the others after a Ctrl-C in rank zero
        assert ending.is_set() and running.wait(10) == -signal.SIGKILL
        assert observe([running], ending) == []
        assert held.pid == running.pid  # everything else is the process's own
    finally:
        running.kill()


def test_rank_zero_failing_kills_the_early_ranks_and_the_environment_is_restored(monkeypatch):
    """The context around the run: the processes get Lightning's launch variables, a failure of rank zero's run
    kills them, and afterwards nothing in this interpreter looks launched from outside."""
    monkeypatch.setattr(launch, "early_rank_count", lambda cfg: 2)
    monkeypatch.setattr(launch, "child_command",
                        lambda local_rank: ([sys.executable, "-c", "import time; time.sleep(60)"], None))
    with pytest.raises(RuntimeError, match="bad data"), launch.start_ranks_early(None) as ranks:
        assert os.environ["LOCAL_RANK"] == "0" and os.environ["WORLD_SIZE"] == "2"
        (process,) = ranks.processes
        raise RuntimeError("bad data")
    assert process.returncode == -signal.SIGKILL
    assert not any(name in os.environ for name in ("LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT"))


def test_the_child_command_is_the_one_lightnings_launcher_builds(monkeypatch, tmp_path):
    """Built without importing Lightning (it takes seconds); must stay what Lightning's script launcher runs."""
    from lightning_fabric.strategies.launchers.subprocess_script import _hydra_subprocess_cmd

    cfg = compose_train(CPU_DDP)
    cfg.hydra.run.dir = str(tmp_path / "run folder")
    cfg.hydra.runtime.cwd = str(tmp_path)
    HydraConfig.instance().set_config(cfg)
    monkeypatch.setattr(sys, "argv", ["train.py", "experiment=cpu_fast", "data.root=/data/x"])
    for local_rank in (1, 3):
        ours, lightnings = launch.child_command(local_rank), _hydra_subprocess_cmd(local_rank)
        assert list(ours[0]) == list(lightnings[0]) and ours[1] == lightnings[1] == str(tmp_path)
    monkeypatch.setenv("STANDALONE_PORT", "29517")
    assert launch.free_port() == 29517
    monkeypatch.delenv("STANDALONE_PORT")
    assert 0 < launch.free_port() < 65536
