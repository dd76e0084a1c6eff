"""Pre-flight checks where the stages will run: one small Ray task on every node that can host
a stage worker. The driver may sit on a head node without GPUs or without ``/data`` (``submit``
runs it there), so what a stage reads and writes — the dataset, ``model.pretrained``, a
local storage root — is checked on each node, and an error names the node."""
from __future__ import annotations

from pathlib import Path

from mtshare.config import ConfigError, SuiteConfig

NODE_CHECK_TIMEOUT_S = 120.0
DECODE_PER_SPLIT = 2  # label files decoded per split on each node (the driver decodes more)


def check_this_node(cfg: SuiteConfig, storage_root: str | None) -> str | None:
    """The first problem a stage on this machine would hit, as an error line; None if none."""
    from mtshare.data import DataError
    from mtshare.data.check import check_dataset
    from mtshare.models.vit import check_pretrained

    try:
        check_dataset(cfg.dataset.name, cfg.dataset.root, max_decode=DECODE_PER_SPLIT)
    except DataError as e:
        return f"dataset.root: {e}"
    try:
        check_pretrained(cfg.model)
    except ConfigError as e:
        return str(e)
    if storage_root:
        from cluster.workdir import check_writable

        try:
            check_writable(Path(storage_root), f"storage: {storage_root}")  # the driver's check, here
        except ConfigError as e:
            return str(e)
    return None


def check_nodes(cfg: SuiteConfig, storage_root: str | None, hosts: list[dict]) -> None:
    """Run :func:`check_this_node` on each node of ``hosts`` (``ray.nodes()`` entries) at once.
    Raises :class:`ConfigError` for the first node with a problem, naming it."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    remote = ray.remote(num_cpus=0, max_retries=0)(check_this_node)
    pending = {
        remote.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(
            cfg, storage_root): n for n in hosts
    }
    ready, late = ray.wait(list(pending), num_returns=len(pending), timeout=NODE_CHECK_TIMEOUT_S)
    for ref in ready:
        problem = ray.get(ref)
        if problem:
            raise ConfigError(f"{problem} (on node {_name(pending[ref])})")
    if late:
        raise ConfigError(f"pre-flight: node {_name(pending[late[0]])} did not answer within "
                          f"{NODE_CHECK_TIMEOUT_S:g} s")


def _name(node: dict) -> str:
    return f"{node.get('NodeManagerHostname') or node.get('NodeManagerAddress')} " \
           f"{node.get('NodeManagerAddress')} id {node['NodeID'][:12]}"
