"""Device mesh construction: `MeshConfig` (the `mesh:` section of a recipe) -> `jax.sharding.Mesh`.

Axes, outermost first: `data` (pure data parallel), `fsdp` (data parallel with sharded parameters), `expert`
(experts inside MoE layers, more batch elsewhere), `tensor` (heads / ffn width). The order runs from least to
most communication-hungry, which is the order `mesh_utils` wants so `tensor` lands on the closest devices.
A multi-slice job multiplies an axis by its `dcn_*` size: the slow data-centre network then carries only
that axis's (rare) collectives.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, fields

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh

from openr1_jax.errors import UserError

MESH_AXES: tuple[str, ...] = ("data", "fsdp", "expert", "tensor")


@dataclass(frozen=True)
class MeshConfig:
    """Mesh axis sizes within a slice (ICI; -1 = all remaining devices) and across slices (DCN)."""

    data: int = field(default=1, metadata={"help": "data-parallel size within a slice (-1: the rest)"})
    fsdp: int = field(default=-1, metadata={"help": "fully-sharded data-parallel size within a slice (-1: the rest)"})
    expert: int = field(default=1, metadata={"help": "expert-parallel size within a slice (-1: the rest)"})
    tensor: int = field(default=1, metadata={"help": "tensor-parallel size within a slice (-1: the rest)"})
    dcn_data: int = field(default=1, metadata={"help": "data-parallel size across slices"})
    dcn_fsdp: int = field(default=1, metadata={"help": "fsdp size across slices"})
    dcn_expert: int = field(default=1, metadata={"help": "expert-parallel size across slices"})
    dcn_tensor: int = field(default=1, metadata={"help": "tensor-parallel size across slices (rarely wise)"})

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise UserError(f"mesh.{f.name} must be an integer, not {value!r}")
            low = 1 if f.name.startswith("dcn_") else -1
            if value < low or value == 0:
                allowed = "a positive integer" if low == 1 else "a positive integer or -1"
                raise UserError(f"mesh.{f.name} must be {allowed}, not {value}")
        rest = [a for a in MESH_AXES if getattr(self, a) == -1]
        if len(rest) > 1:
            raise UserError(f"mesh: at most one axis may be -1, but {', '.join(rest)} all are")

    def ici_shape(self, devices_per_slice: int) -> tuple[int, ...]:
        """Sizes of (data, fsdp, expert, tensor) within one slice, with -1 resolved."""
        where = "devices" if self.dcn_shape() == (1,) * len(MESH_AXES) else "devices per slice"
        sizes = [getattr(self, a) for a in MESH_AXES]
        known = math.prod(s for s in sizes if s != -1)
        if -1 in sizes:
            if devices_per_slice % known:
                raise UserError(
                    f"mesh {self._describe(sizes)}: the fixed axes ({known}) do not divide the "
                    f"{devices_per_slice} {where}"
                )
            sizes[sizes.index(-1)] = devices_per_slice // known
        if math.prod(sizes) != devices_per_slice:
            raise UserError(
                f"mesh {self._describe(sizes)} = {math.prod(sizes)} does not divide/equal the "
                f"{devices_per_slice} {where}"
            )
        return tuple(sizes)

    def dcn_shape(self) -> tuple[int, ...]:
        return tuple(getattr(self, f"dcn_{a}") for a in MESH_AXES)

    @staticmethod
    def _describe(sizes: Sequence[int]) -> str:
        return " x ".join(f"{a}={s}" for a, s in zip(MESH_AXES, sizes, strict=True))


def make_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The mesh over `devices` (default: all devices of all processes) with axes `MESH_AXES`; each axis's
    full size is its ICI size times its DCN size."""
    devices = list(jax.devices() if devices is None else devices)
    dcn = cfg.dcn_shape()
    slices = math.prod(dcn)
    if len(devices) % slices:
        raise UserError(
            f"mesh dcn {MeshConfig._describe(dcn)} = {slices} slices does not divide the {len(devices)} devices"
        )
    ici = cfg.ici_shape(len(devices) // slices)
    if slices == 1:
        grid = mesh_utils.create_device_mesh(ici, devices, allow_split_physical_axes=True)
    else:
        grid = _hybrid_grid(ici, dcn, devices)
    # Auto axes (not the Explicit axes `jax.make_mesh` now defaults to): shardings live in NamedShardings
    # chosen by our rules table and in `with_sharding_constraint` at block boundaries, and GSPMD propagates
    # the rest. Explicit axes would make every jnp op's output sharding part of its type, so the model code
    # (written once for one device) would need sharding-aware reshapes and `out_sharding=` everywhere.
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def _hybrid_grid(ici: tuple[int, ...], dcn: tuple[int, ...], devices: list) -> np.ndarray:
    """Slices of devices arranged by `dcn`, each slice arranged by `ici`: an axis of full size ici*dcn whose
    outer (dcn) index picks the slice."""
    if hasattr(devices[0], "slice_index"):  # TPU multi-slice
        return mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, allow_split_physical_axes=True)
    if len({d.process_index for d in devices}) == math.prod(dcn):  # one process per granule (GPU, CPU hosts)
        return mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, process_is_granule=True)
    # No slice information (one CPU process simulating slices): consecutive device blocks act as slices.
    per = math.prod(ici)
    blocks = [np.asarray(devices[i * per : (i + 1) * per], dtype=object).reshape(ici) for i in range(math.prod(dcn))]

    def nest(index: np.ndarray):
        return blocks[int(index)] if index.ndim == 0 else [nest(i) for i in index]

    return np.block(nest(np.arange(len(blocks)).reshape(dcn)))
