"""Checkpoints under failure: every filesystem call a save makes fails in turn, twice in a row, then
the save goes through; a real SIGKILL at a random moment; a full disk. After every failure the last
committed step loads (``load_model`` and ``resume``), and the run ends with an uninterrupted run's
weights."""
from __future__ import annotations

import builtins
import errno
import io
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

import causalfusion.checkpoint as checkpoint
from causalfusion.ar_plan import ARPlanConfig
from causalfusion.checkpoint import load_model, load_training_state, read_state
from causalfusion.models import CausalFusion, ModelConfig
from causalfusion.optimization import adamw
from causalfusion.trainer import TrainConfig, Trainer

MODEL = dict(image_size=8, in_channels=1, patch_size=2, hidden_size=16, depth=1, num_heads=2, num_classes=10,
             class_tokens=1)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One thread: these tiny steps run 25x slower with two threads when other processes share the CPUs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def train_cfg(out, **kw) -> TrainConfig:
    return TrainConfig(**{**dict(out=str(out), steps=4, batch_size=4, lr=1e-3, warmup=1, ema_decay=0.9, log_every=3,
                                 ckpt_every=2, sample_every=0, progress=False), **kw})


def trainer(out, resume=False, **kw) -> Trainer:
    return Trainer(ModelConfig(**MODEL), ARPlanConfig(), train_cfg(out, **kw), resume=resume)


class InjectedFault(OSError):
    def __init__(self) -> None:
        super().__init__(errno.ENOSPC, "injected: no space left on device")


class FaultyFS:
    """Counts the filesystem calls that write, rename, link, sync or delete (and the safetensors
    writer), and makes call number ``fail_at`` raise ENOSPC (None: none fails)."""

    OS_CALLS = ("replace", "rename", "link", "fsync", "unlink", "remove", "truncate", "ftruncate", "write")

    def __init__(self, fail_at: int | None = None) -> None:
        self.fail_at, self.calls = fail_at, 0

    def _tick(self) -> None:
        self.calls += 1
        if self.calls == self.fail_at:
            raise InjectedFault()

    def _wrap(self, fn):
        def wrapped(*args, **kwargs):
            self._tick()
            return fn(*args, **kwargs)
        return wrapped

    def _wrap_open(self, fn):
        def wrapped(file, mode="r", *args, **kwargs):
            if any(c in mode for c in "wax+"):
                self._tick()
            return fn(file, mode, *args, **kwargs)
        return wrapped

    @contextmanager
    def active(self):
        mp = pytest.MonkeyPatch()
        try:
            for name in self.OS_CALLS:
                mp.setattr(os, name, self._wrap(getattr(os, name)))
            mp.setattr(builtins, "open", self._wrap_open(builtins.open))
            mp.setattr(io, "open", self._wrap_open(io.open))
            mp.setattr(checkpoint, "save_file", self._wrap(checkpoint.save_file))
            yield self
        finally:
            mp.undo()


def snapshot(tr: Trainer) -> dict:
    """What a checkpoint of ``tr`` must restore: weights, EMA, optimizer moments."""
    opt = {f"{i}.{k}": v.clone() for i, s in tr.opt.state_dict()["state"].items() for k, v in s.items()}
    return {"model": {k: v.clone() for k, v in tr.model.state_dict().items()},
            "ema": {k: v.clone() for k, v in tr.ema.state_dict().items()}, "opt": opt}


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def loaded_step(run: Path, snapshots: dict[int, dict]) -> int:
    """The step the run directory loads as, checked to be one of ``snapshots`` in every part: the EMA
    through ``load_model``, model + EMA + optimizer through ``load_training_state`` (what --resume reads)."""
    step = read_state(run)["step"]
    assert step in snapshots, step
    want = snapshots[step]
    assert_same(load_model(run).state_dict(), want["ema"])
    model, ema = CausalFusion(ModelConfig(**MODEL)), CausalFusion(ModelConfig(**MODEL))
    opt = adamw(model.parameters(), 1e-3)
    load_training_state(run, model, ema, opt)
    assert_same(model.state_dict(), want["model"])
    assert_same(ema.state_dict(), want["ema"])
    assert_same({f"{i}.{k}": v for i, s in opt.state_dict()["state"].items() for k, v in s.items()}, want["opt"])
    return step


def reference(tmp_path: Path, steps: int) -> tuple[dict[int, dict], dict]:
    """An uninterrupted run: the snapshot at every step, and its log.csv (without the it/s column)."""
    snaps: dict[int, dict] = {}
    tr = trainer(tmp_path / "reference", steps=steps)
    tr.train(callbacks=[lambda t, _: snaps.__setitem__(t.step, snapshot(t))])
    return snaps, log_rows(tmp_path / "reference")


class Stop(Exception):
    pass


def interrupted(out: Path, stop_at: int, **kw) -> Path:
    """A run of ``trainer(out, **kw)`` stopped right after step ``stop_at`` (and its checkpoint)."""
    def stop(t, _):
        if t.step == stop_at:
            raise Stop

    with pytest.raises(Stop):
        trainer(out, **kw).train(callbacks=[stop])
    return out


def log_rows(run: Path) -> list[list[str]]:
    return [ln.split(",")[:5] for ln in (run / "log.csv").read_text().splitlines()]


def save_calls(tmp_path: Path) -> int:
    """How many counted filesystem calls one save into a run with a checkpoint makes."""
    tr = trainer(tmp_path / "count", steps=2)
    tr.train()
    tr.step += 1
    with FaultyFS().active() as fs:
        tr.save()
    shutil.rmtree(tmp_path / "count")
    return fs.calls


def failing_save(tr: Trainer, fail_at: int, at_step: int) -> Trainer:
    """``tr`` with its save at ``at_step`` failing at its ``fail_at``-th filesystem call."""
    save = tr.save

    def faulty_save() -> None:
        with FaultyFS(fail_at if tr.step == at_step else None).active():
            save()

    tr.save = faulty_save
    return tr


def test_every_failing_call_of_a_save_twice_in_a_row_leaves_the_last_commit(tmp_path):
    """The save at step 4 fails at its k-th filesystem call, for every k; the run is resumed and fails
    at the same call again; resumed once more, it goes through. After each failure the run loads as step
    2 (or 4 where the failure came after the commit) in every part, and the run ends with an uninterrupted
    run's weights, log.csv and files."""
    snaps, log = reference(tmp_path, steps=6)
    files = sorted(p.name for p in (tmp_path / "reference").iterdir())
    calls = save_calls(tmp_path)
    assert calls >= 4
    base = interrupted(tmp_path / "base", stop_at=2, steps=6)
    logs = {}
    for k in range(1, calls + 1):
        run = tmp_path / f"k{k}"
        shutil.copytree(base, run)
        for attempt in range(2):
            try:
                failing_save(trainer(run, resume=True, steps=6), k, at_step=4).train()
            except OSError:
                pass
            assert loaded_step(run, snaps) in (2, 4, 6), (k, attempt)
        if read_state(run)["step"] < 6:
            trainer(run, resume=True, steps=6).train()
        assert loaded_step(run, snaps) == 6, k
        assert sorted(p.name for p in run.iterdir()) == files, k  # nothing left over
        logs[k] = log_rows(run)
        shutil.rmtree(run)
    assert all(rows == log for rows in logs.values()), [k for k, rows in logs.items() if rows != log]


KILL_SCRIPT = """
import sys
import torch
from causalfusion.ar_plan import ARPlanConfig
from causalfusion.models import CausalFusion, ModelConfig
from causalfusion.trainer import TrainConfig, Trainer
out, steps, resume = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
cfg = TrainConfig(out=out, steps=steps, batch_size=4, lr=1e-3, warmup=1, ema_decay=0.9, log_every=3, ckpt_every=1,
                  sample_every=0, progress=False)
torch.set_num_threads(int(sys.argv[4]))  # the test's: the same sums in the same order
Trainer(ModelConfig(**{model}), ARPlanConfig(), cfg, resume=resume).train()
"""


def test_sigkill_at_a_random_moment_loses_at_most_the_steps_since_the_last_commit(tmp_path):
    """A subprocess that checkpoints every step is killed with SIGKILL at a random moment (a few
    trials); the run loads as a committed step and, resumed, ends with the uninterrupted run's weights
    and log."""
    steps = 60
    snaps, log = reference(tmp_path, steps=steps)
    script = tmp_path / "train.py"
    script.write_text(KILL_SCRIPT.replace("{model}", repr(MODEL)))
    env = {**os.environ, "PYTHONPATH": str(Path(checkpoint.__file__).parents[1])}
    runs = [tmp_path / f"kill{trial}" for trial in range(3)]
    delays = [random.uniform(0.0, 0.3) for _ in runs]  # after the first commit: somewhere among the next saves
    procs = [subprocess.Popen([sys.executable, str(script), str(run), str(steps), "0", str(torch.get_num_threads())],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for run in runs]

    def kill(run: Path, proc: subprocess.Popen, delay: float) -> None:
        deadline = time.monotonic() + 120
        while not (run / "state.json").exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()

    killers = [threading.Thread(target=kill, args=args) for args in zip(runs, procs, delays)]
    for t in killers:
        t.start()
    for t in killers:
        t.join()
    for run, proc, delay in zip(runs, procs, delays):
        assert proc.returncode == -signal.SIGKILL, (delay, proc.stderr.read().decode()[-2000:])
        killed_at = loaded_step(run, snaps)
        assert 1 <= killed_at < steps, delay
        trainer(run, resume=True, steps=steps).train()
        assert loaded_step(run, snaps) == steps, delay
        assert log_rows(run) == log, delay


@contextmanager
def small_filesystem(path: Path, size: str):
    """A tmpfs of ``size`` at ``path`` (needs the right to mount: skipped otherwise)."""
    path.mkdir()
    if shutil.which("mount") is None or (hasattr(os, "geteuid") and os.geteuid() != 0):
        pytest.skip("a full-disk test needs a small tmpfs: mounting one needs root")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({r.stderr.strip() or r.returncode})")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_a_full_disk_during_training_and_again_during_resume(tmp_path):
    """A disk filled up to half a checkpoint of room: the save that runs out of space fails, the one
    before it still loads; resumed on the full disk it fails again and still loads; with room made
    (the disk is not cleaned by hand), the run finishes as an uninterrupted run does."""
    snaps, log = reference(tmp_path, steps=6)
    probe = tmp_path / "probe"
    trainer(probe, steps=2).train()
    ckpt = sum(p.stat().st_size for p in probe.iterdir() if p.suffix == ".safetensors")
    with small_filesystem(tmp_path / "disk", f"{3 * ckpt // 1024 + 64}k") as disk:  # old + new + slack
        run = interrupted(disk / "run", stop_at=2, steps=6)
        ballast = disk / "ballast"
        free = shutil.disk_usage(disk).free
        ballast.write_bytes(b"\0" * max(free - ckpt // 2, 0))  # room for half a checkpoint
        with pytest.raises(OSError):
            trainer(run, resume=True, steps=6).train()
        assert loaded_step(run, snaps) == 2
        with pytest.raises(OSError):
            trainer(run, resume=True, steps=6).train()
        assert loaded_step(run, snaps) == 2
        ballast.unlink()
        trainer(run, resume=True, steps=6).train()
        assert loaded_step(run, snaps) == 6
        assert log_rows(run) == log


def test_an_inf_gradient_stops_the_run_before_its_step_and_leaves_the_checkpoint(tmp_path, capsys):
    """``train --lr 1e10 --warmup 0`` resumed from a good checkpoint: one line naming the step, exit 2,
    the checkpoint's files as they were, and no step applied with the inf gradient."""
    from causalfusion.cli import main

    run = interrupted(tmp_path / "run", stop_at=2, steps=6)
    ckpt = {p.name: p.read_bytes() for p in run.iterdir() if p.name != "log.csv"}
    code = main(["train", "--out", str(run), "--resume", "--steps", "400", "--lr", "1e10", "--warmup", "0",
                 "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "at step" in err[0] and ("gradient norm" in err[0] or "loss is" in err[0]), err
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.name != "log.csv"} == ckpt


def test_apply_gradients_refuses_an_inf_gradient_without_stepping():
    from causalfusion.optimization import apply_gradients

    model = torch.nn.Linear(2, 2)
    ema, opt = torch.nn.Linear(2, 2), torch.optim.AdamW(model.parameters(), lr=1e-3)
    before = [p.detach().clone() for p in model.parameters()]
    model.weight.grad = torch.full((2, 2), float("inf"))
    model.bias.grad = torch.zeros(2)
    with pytest.raises(FloatingPointError, match="gradient norm is inf at step 7"):
        apply_gradients(model, ema, opt, 1.0, 0.9, step=7)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before)) and not opt.state


def test_a_pickle_refusal_never_suggests_weights_only_false(tmp_path):
    from causalfusion.metrics.inception import load_inception_weights

    path = tmp_path / "w.pt"
    torch.save({"w": torch.zeros(1), "obj": Stop()}, path)
    with pytest.raises(ValueError) as info:
        load_inception_weights(path)
    assert "weights_only=False" not in str(info.value) and "pickle" in str(info.value) and "\n" not in str(info.value)


def test_channels_with_digits_is_refused_up_front(tmp_path, capsys):
    from causalfusion.cli import main

    code = main(["train", "--data", "digits", "--channels", "2", "--out", str(tmp_path / "run"), "--steps", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--channels" in err[0]
    assert not (tmp_path / "run").exists() and list(tmp_path.iterdir()) == []
