"""How `pytest -n 2` (the README's test command) shares the suite between its two workers.

A unit of work is a run of consecutive tests of one file, handed out in collection order; a worker takes the next
unit when it is done with its last. Whole files keep a module's fixtures to one worker, and the order keeps the
TPU ahead-of-time compiles, which conftest moves to the end, last on whichever worker runs them. Files whose tests
start sandboxed programs share one unit: the sandbox tests check that no sandboxed process outlives its run, and
the other files' sandboxes would look like leftovers.

pytest-xdist's own `--dist loadgroup` would do part of this, but in xdist 3.8 it renames the items' `_nodeid`,
which pytest 9.2 no longer reads, so its groups are silently ignored.
"""

from __future__ import annotations

from xdist.scheduler import LoadScopeScheduling

SHARED_UNITS = {
    "tests/rl/test_sandbox.py": "sandboxed programs",
    "tests/rl/test_code_reward.py": "sandboxed programs",
    "tests/rl/test_rewards.py": "sandboxed programs",
}


def units_of(nodeids: list[str]) -> dict[str, str]:
    """nodeid -> unit: runs of consecutive tests of one file (a file split by the TPU reordering is two units)."""
    units, run, previous = {}, 0, None
    for nodeid in nodeids:
        path = nodeid.split("::")[0]
        if path != previous:
            run, previous = run + 1, path
        units[nodeid] = SHARED_UNITS.get(path, f"{path} #{run}")
    return units


class FileRunScheduling(LoadScopeScheduling):
    def __init__(self, config, log=None):
        super().__init__(config, log)
        config.option.loadscopereorder = False  # collection order, not the biggest unit first
        self._units: dict[str, str] = {}

    def schedule(self) -> None:
        if self.collection is None and self.registered_collections:
            self._units = units_of(list(next(iter(self.registered_collections.values()))))
        super().schedule()

    def _split_scope(self, nodeid: str) -> str:
        return self._units[nodeid]
