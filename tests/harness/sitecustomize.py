"""Test harness, on the PYTHONPATH of the processes a fault test starts (Ray workers, a driver
subprocess). Nothing happens unless one of these is set:

``MTSHARE_STORAGE_FAULTS``  storage fault injection, installed as soon as ``cluster.storage`` is
                            imported (``tests/storage_faults.py``);
``MTSHARE_FAIL_STAGE``      ``<suite>:<stage>``: that stage of that suite raises StageFailure on its
                            first training step (a sweep test fails one trial on purpose; a config
                            knob would fail every trial of a task).
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
    step = module.Trainer.train_step

    def train_step(self, batch):
        if self.spec.suite == suite and self.spec.name == stage:
            raise module.StageFailure(f"{stage}: injected failure (MTSHARE_FAIL_STAGE)")
        return step(self, batch)

    module.Trainer.train_step = train_step


if os.environ.get("MTSHARE_STORAGE_FAULTS"):
    _after_import("cluster.storage", _storage_faults)
if os.environ.get("MTSHARE_FAIL_STAGE"):
    _after_import("mtshare.train", _fail_stage)
