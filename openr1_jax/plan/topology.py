"""TPU slices the planner knows: chip specs and the device descriptions libtpu compiles for (no TPU needed)."""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from dataclasses import dataclass

from openr1_jax.errors import UserError

GIB = 2**30


@dataclass(frozen=True)
class Chip:
    name: str
    hbm_bytes: int
    peak_flops: float  # dense bf16 FLOP/s
    hbm_bandwidth: float  # bytes/s
    cores_per_chip: int  # the slice name counts TensorCores on v5p (2 per chip), chips on v5e/v6e


CHIPS = {
    "v5e": Chip("v5e", 16 * GIB, 197e12, 819e9, 1),
    "v5p": Chip("v5p", 95 * GIB, 459e12, 2765e9, 2),
    "v6e": Chip("v6e", 32 * GIB, 918e12, 1640e9, 1),
}
# chips -> the physical grid that jax's topology description takes (v5e/v6e: 2-D, v5p: 3-D torus)
GRID_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
GRID_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8", 512: "8x8x8"}


@dataclass(frozen=True)
class Topology:
    name: str  # e.g. "v5p-512"
    chip: Chip
    chips: int
    grid: str  # e.g. "v5p:4x8x8"

    def devices(self):
        import importlib.util

        from jax.experimental import topologies

        if importlib.util.find_spec("libtpu") is None:
            raise UserError("planning for TPUs needs libtpu: pip install 'openr1-jax[tpu]' (no TPU is needed)")
        # libtpu takes a machine-wide lockfile so two processes never drive one TPU. Any jax process here loads
        # libtpu when it is installed (CPU training jobs too) and holds that lock; planning only compiles, so it
        # may share libtpu with them.
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
        try:
            with _quiet_native_stderr():  # libtpu warns that this machine has no TPU metadata; we know
                return topologies.get_topology_desc(platform="tpu", topology_name=self.grid).devices
        except RuntimeError as e:  # jax's JaxRuntimeError: libtpu could not start (it said why on stderr)
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"libtpu could not describe a {self.name} slice: {first}") from None


def parse_topology(name: str) -> Topology:
    """ "v5p-512" (TensorCores), "v5e-8" / "v5litepod-8" / "v6e-256" (chips)."""
    m = re.fullmatch(r"(v5e|v5litepod|v5p|v6e)-(\d+)", name.strip().lower())
    if not m:
        raise UserError(f"--topology '{name}' is not a TPU slice like v5p-512, v5e-8 or v6e-256")
    chip = CHIPS["v5e" if m[1] == "v5litepod" else m[1]]
    count = int(m[2])
    grids = GRID_3D if chip.name == "v5p" else GRID_2D
    chips = count // chip.cores_per_chip
    if count % chip.cores_per_chip or chips not in grids:
        sizes = ", ".join(f"{chip.name}-{c * chip.cores_per_chip}" for c in grids)
        raise UserError(f"--topology '{name}' is not a {chip.name} slice size this planner knows ({sizes})")
    return Topology(name, chip, chips, f"{chip.name}:{grids[chips]}")


@contextlib.contextmanager
def _quiet_native_stderr():
    """Send file descriptor 2 (where C++ libraries log) to a temporary file; replay it only on failure."""
    with tempfile.TemporaryFile() as sink:
        saved = os.dup(2)
        os.dup2(sink.fileno(), 2)
        try:
            yield
        except BaseException:
            os.dup2(saved, 2)
            sink.seek(0)
            os.write(2, sink.read())
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)
