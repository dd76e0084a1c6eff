"""Test harness, on the PYTHONPATH of the processes a fault test starts (Ray workers, a driver
subprocess). Nothing happens unless one of these is set:

``MTSHARE_STORAGE_FAULTS``  storage fault injection, installed as soon as ``cluster.storage`` is
                            imported (``tests/storage_faults.py``);
``MTSHARE_FAIL_STAGE``      ``<suite>:<stage>[@<iteration>]``: that stage of that suite raises
                            StageFailure on its first training step (or at that iteration, after
                            the checkpoints before it), on every rank (a sweep test fails one trial on
                            purpose; a config knob would fail every trial of a task).
``MTSHARE_CRASH_STAGE``     ``<suite>:<stage>@<iteration>:<flag file>``: the last rank of that stage's
                            group dies (``os._exit``) at that iteration, once: the flag file is
                            written first, and a restarted group goes on (a worker lost mid-step).
``MTSHARE_SLOW_CALIBRATION`` seconds: every call of ``mtshare.operating_point.calibrate_task``
                            sleeps that long first, on every rank that calls it (a calibration
                            that takes longer than the stage's collective timeout).
"""
import os
import sys


def _after_import(name, install):
    """Call ``install(module)`` right after module ``name`` is first imported."""
    import importlib.abc
    import importlib.util

    class _AfterImport(importlib.abc.MetaPathFinder):
        def find_spec(self, fullname, path, target=None):
            if fullname != name:
                return None
            sys.meta_path.remove(self)
            spec = importlib.util.find_spec(fullname)
            run = spec.loader.exec_module

            def exec_module(module):
                run(module)
                install(module)

            spec.loader.exec_module = exec_module
            return spec

    sys.meta_path.insert(0, _AfterImport())


def _storage_faults(module):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import storage_faults

    storage_faults.install(module)


def _fail_stage(module):
    suite, stage = os.environ["MTSHARE_FAIL_STAGE"].split(":", 1)
    stage, _, at = stage.partition("@")
    step = module.Trainer.train_step

    def train_step(self, batch):
        if self.spec.suite == suite and self.spec.name == stage and self.iteration >= int(at or 0):
            raise module.StageFailure(f"{stage}: injected failure (MTSHARE_FAIL_STAGE) at iteration {self.iteration}")
        return step(self, batch)

    module.Trainer.train_step = train_step


def _crash_stage(module):
    suite, rest = os.environ["MTSHARE_CRASH_STAGE"].split(":", 1)
    stage, rest = rest.split("@", 1)
    at, flag = rest.split(":", 1)
    step = module.Trainer.train_step

    def train_step(self, batch):
        if (self.spec.suite == suite and self.spec.name == stage and self.iteration == int(at)
                and self.rank == self.world_size - 1 and not os.path.exists(flag)):
            with open(flag, "w") as f:
                f.write(f"{self.rank} {self.iteration}")
            os._exit(1)
        return step(self, batch)

    module.Trainer.train_step = train_step


def _slow_calibration(module):
    import time

    calibrate_task = module.calibrate_task

    def slow(*args, **kwargs):
        time.sleep(float(os.environ["MTSHARE_SLOW_CALIBRATION"]))
        return calibrate_task(*args, **kwargs)

    module.calibrate_task = slow


if os.environ.get("MTSHARE_STORAGE_FAULTS"):
    _after_import("cluster.storage", _storage_faults)
if os.environ.get("MTSHARE_FAIL_STAGE"):
    _after_import("mtshare.train", _fail_stage)
if os.environ.get("MTSHARE_CRASH_STAGE"):
    _after_import("mtshare.train", _crash_stage)
if os.environ.get("MTSHARE_SLOW_CALIBRATION"):
    _after_import("mtshare.operating_point", _slow_calibration)
