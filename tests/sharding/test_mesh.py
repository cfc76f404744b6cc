"""make_mesh: axis sizes, -1, multi-slice (DCN) layout, axis types and the errors a user can cause."""

import jax
import numpy as np
import pytest
from jax.sharding import AxisType

from openr1_jax.errors import UserError
from openr1_jax.sharding.mesh import MESH_AXES, MeshConfig, make_mesh


def sizes(mesh):
    return tuple(mesh.shape[a] for a in MESH_AXES)


@pytest.mark.parametrize(
    "cfg,expected",
    [
        (MeshConfig(), (1, 8, 1, 1)),
        (MeshConfig(data=8, fsdp=1), (8, 1, 1, 1)),
        (MeshConfig(fsdp=4, tensor=2), (1, 4, 1, 2)),
        (MeshConfig(expert=4), (1, 2, 4, 1)),
        (MeshConfig(data=2, fsdp=1, expert=2, tensor=-1), (2, 1, 2, 2)),
    ],
)
def test_sizes_and_the_rest(cfg, expected):
    mesh = make_mesh(cfg)
    assert mesh.axis_names == MESH_AXES
    assert sizes(mesh) == expected
    assert sorted(d.id for d in mesh.devices.flat) == list(range(8))
    assert set(mesh.axis_types) == {AxisType.Auto}


def test_subset_of_devices():
    mesh = make_mesh(MeshConfig(fsdp=2), jax.devices()[:2])
    assert sizes(mesh) == (1, 2, 1, 1)


def test_dcn_axis_is_ici_times_dcn_with_slices_outermost():
    mesh = make_mesh(MeshConfig(data=1, fsdp=-1, dcn_data=2))  # two simulated slices of 4 devices
    assert sizes(mesh) == (2, 4, 1, 1)
    ids = np.vectorize(lambda d: d.id)(mesh.devices)
    assert set(ids[0].flat) == {0, 1, 2, 3} and set(ids[1].flat) == {4, 5, 6, 7}

    mesh = make_mesh(MeshConfig(fsdp=2, expert=1, dcn_fsdp=2, dcn_expert=2))
    assert sizes(mesh) == (1, 4, 2, 1)
    ids = np.vectorize(lambda d: d.id)(mesh.devices)[0]
    # slice (i, j) of the 2x2 DCN grid owns fsdp rows 2i..2i+1 and expert column j.
    assert {int(ids[0, 0, 0]), int(ids[1, 0, 0])} == {0, 1}
    assert {int(ids[2, 1, 0]), int(ids[3, 1, 0])} == {6, 7}


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(data=2, fsdp=3), "mesh data=2 x fsdp=3 x expert=1 x tensor=1 = 6 does not divide/equal the 8 devices"),
        (dict(fsdp=-1, tensor=3), "the fixed axes \\(3\\) do not divide the 8 devices"),
        (dict(fsdp=-1, dcn_data=3), "3 slices does not divide the 8 devices"),
    ],
)
def test_size_errors_name_the_mesh(kwargs, message):
    with pytest.raises(UserError, match=message):
        make_mesh(MeshConfig(**kwargs))


@pytest.mark.parametrize(
    "kwargs,field",
    [(dict(data=-1), "at most one axis"), (dict(tensor=0), "mesh.tensor"), (dict(dcn_fsdp=-1), "mesh.dcn_fsdp")],
)
def test_config_validation_names_the_field(kwargs, field):
    with pytest.raises(UserError, match=field):
        MeshConfig(**kwargs)
