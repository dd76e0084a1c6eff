"""Test harness, on the PYTHONPATH of the processes a fault test starts (Ray workers, a driver
subprocess): when ``MTSHARE_STORAGE_FAULTS`` is set, storage fault injection is installed as
soon as ``cluster.storage`` is imported (``tests/storage_faults.py``). Nothing else happens."""
import os
import sys

if os.environ.get("MTSHARE_STORAGE_FAULTS"):
    import importlib.abc
    import importlib.util

    class _AfterImport(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name != "cluster.storage":
                return None
            sys.meta_path.remove(self)
            spec = importlib.util.find_spec(name)
            run = spec.loader.exec_module

            def exec_module(module):
                run(module)
                sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
                import storage_faults

                storage_faults.install(module)

            spec.loader.exec_module = exec_module
            return spec

    sys.meta_path.insert(0, _AfterImport())

if os.environ.get("MTSHARE_FAIL_STAGE"):
    # "<suite>:<stage>": that stage of that suite raises StageFailure on its first training step
    # (a sweep test fails one trial on purpose; a config knob would fail every trial of a task).
    import importlib.abc
    import importlib.util

    class _FailStage(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name != "mtshare.train":
                return None
            sys.meta_path.remove(self)
            spec = importlib.util.find_spec(name)
            run = spec.loader.exec_module

            def exec_module(module):
                run(module)
                suite, stage = os.environ["MTSHARE_FAIL_STAGE"].split(":", 1)
                step = module.Trainer.train_step

                def train_step(self, batch):
                    if self.spec.suite == suite and self.spec.name == stage:
                        raise module.StageFailure(f"{stage}: injected failure (MTSHARE_FAIL_STAGE)")
                    return step(self, batch)

                module.Trainer.train_step = train_step

            spec.loader.exec_module = exec_module
            return spec

    sys.meta_path.insert(0, _FailStage())
