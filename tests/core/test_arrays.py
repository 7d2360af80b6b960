"""segloss_core.arrays: the one place that asks which library and device an array belongs to."""

from __future__ import annotations

import array_api_compat
import numpy as np
import pytest
import torch

from segloss_core import arrays


def test_namespace_of_one_or_several_arrays():
    assert arrays.get_namespace(np.zeros(2)) is array_api_compat.array_namespace(np.zeros(2))
    assert arrays.get_namespace(np.zeros(2), None, np.ones(3)) is arrays.get_namespace(np.zeros(1))
    assert arrays.is_torch(arrays.get_namespace(torch.zeros(1), torch.ones(2)))
    assert arrays.is_numpy(arrays.get_namespace(np.zeros(1)))
    assert not arrays.is_cupy(arrays.get_namespace(np.zeros(1)))


def test_mixed_libraries_and_non_arrays_raise():
    with pytest.raises(TypeError, match=r"arrays of different libraries: numpy and torch"):
        arrays.get_namespace(np.zeros(1), torch.zeros(1))
    with pytest.raises(TypeError):
        arrays.get_namespace([1.0, 2.0])
    with pytest.raises(TypeError, match="at least one array"):
        arrays.get_namespace(None)


def test_library_names():
    assert arrays.library_name(np.zeros(1)) == "numpy"
    assert arrays.library_name(torch.zeros(1)) == "torch"


def test_device():
    assert arrays.device(torch.zeros(1), None, torch.ones(2)) == torch.device("cpu")
    assert str(arrays.device(np.zeros(1))) == "cpu"
    assert arrays.device(None) is None
    meta = torch.empty(1, device="meta")
    with pytest.raises(ValueError, match=r"arrays on different devices: cpu and meta"):
        arrays.device(torch.zeros(1), meta)


def test_numpy_round_trip_keeps_library_and_device():
    t = torch.arange(6.0, requires_grad=True).reshape(2, 3)
    a = arrays.to_numpy(t)
    assert isinstance(a, np.ndarray) and a.tolist() == [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]
    back = arrays.from_numpy(a * 2, like=t)
    assert isinstance(back, torch.Tensor) and back.device == t.device and back.dtype == torch.float32
    torch.testing.assert_close(back, t.detach() * 2)
    x = np.arange(3)
    assert arrays.to_numpy(x) is x and arrays.from_numpy(x, like=np.zeros(1)) is x
