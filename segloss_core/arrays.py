"""Which array library and device an array belongs to, and conversions to NumPy and back.

The one place segloss asks "what is this array" (in the manner of scikit-learn's
``sklearn/utils/_array_api.py``): everything else calls these functions instead of
``array_api_compat`` or ``type(x).__module__``.

* :func:`get_namespace` — the array-API namespace of one or more arrays (memoised per type, so
  ``torch.compile`` traces a dict lookup); arrays of different libraries raise ``TypeError``.
* :func:`device` — their common device (``None`` where it is unknown, e.g. a JAX tracer).
* :func:`library_name` — the library's name for messages (``"numpy"``, ``"torch"``, ``"jax"``).
* :func:`to_numpy` / :func:`from_numpy` — a host NumPy copy, and back onto the library and
  device of a given array (for host-only code such as scipy's EDT).

>>> import numpy as np
>>> xp = get_namespace(np.zeros(2), np.ones(3))
>>> library_name(np.zeros(2)), str(device(np.zeros(2)))
('numpy', 'cpu')
>>> from_numpy(np.arange(3), like=np.zeros(1)).tolist()
[0, 1, 2]
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import array_api_compat
import numpy as np

Array = Any

__all__ = ["device", "from_numpy", "get_namespace", "is_cupy", "is_numpy", "is_torch", "library_name", "to_numpy"]

_NAMESPACES: dict[type, Any] = {}
_DEVICE_GETTERS: dict[type, Callable[[Array], Any]] = {}


def _namespace_of(x: Array) -> Any:
    namespace = _NAMESPACES.get(type(x))
    if namespace is None:
        namespace = array_api_compat.array_namespace(x)
        _NAMESPACES[type(x)] = namespace
    return namespace


def _library(xp: Any) -> str:
    name = getattr(xp, "__name__", type(xp).__name__)
    return name.removeprefix("array_api_compat.").split(".")[0]


def library_name(x: Array) -> str:
    """The name of ``x``'s array library (``"numpy"``, ``"torch"``, ``"cupy"``, ``"jax"``, …)."""
    return _library(_namespace_of(x))


def get_namespace(*arrays: Array | None) -> Any:
    """The array-API namespace shared by ``arrays`` (``None`` entries are skipped).

    Raises ``TypeError`` for something that is not an array, and for arrays of different
    libraries (naming both), since no segloss computation mixes them.
    """
    present = [a for a in arrays if a is not None]
    if not present:
        raise TypeError("get_namespace needs at least one array")
    xp = _namespace_of(present[0])
    for other in present[1:]:
        other_xp = _namespace_of(other)
        if other_xp is not xp:
            raise TypeError(f"arrays of different libraries: {_library(xp)} and {_library(other_xp)}")
    return xp


def is_numpy(xp: Any) -> bool:
    """Whether namespace ``xp`` is NumPy's."""
    return array_api_compat.is_numpy_namespace(xp)


def is_cupy(xp: Any) -> bool:
    """Whether namespace ``xp`` is CuPy's."""
    return array_api_compat.is_cupy_namespace(xp)


def is_torch(xp: Any) -> bool:
    """Whether namespace ``xp`` is PyTorch's."""
    return array_api_compat.is_torch_namespace(xp)


def _attribute_device(x: Array) -> Any:
    """``x.device``: a plain function, which torch.compile traces (it cannot trace operator.attrgetter)."""
    return x.device


def _device_getter(x: Array) -> Callable[[Array], Any]:
    getter = _DEVICE_GETTERS.get(type(x))
    if getter is None:
        # torch: the attribute itself (traceable by torch.compile); others: array_api_compat's rule
        getter = _attribute_device if is_torch(_namespace_of(x)) else array_api_compat.device
        _DEVICE_GETTERS[type(x)] = getter
    return getter


def _device_or_none(x: Array) -> Any:
    try:
        return _device_getter(x)(x)
    except Exception:  # noqa: BLE001 - e.g. a JAX tracer inside jit has no device
        return None


def device(*arrays: Array | None) -> Any:
    """The device of ``arrays`` (``None`` entries skipped; ``None`` if no array has a known device).

    Raises ``ValueError`` if two arrays are on different devices.
    """
    found = None
    for x in arrays:
        if x is None:
            continue
        here = _device_or_none(x)
        if here is None:
            continue
        if found is None:
            found = here
        elif here != found:
            raise ValueError(f"arrays on different devices: {found} and {here}")
    return found


def to_numpy(x: Array) -> np.ndarray:
    """A NumPy array with ``x``'s values, on the host (no copy for NumPy input; no gradient)."""
    xp = get_namespace(x)
    if is_numpy(xp):
        return np.asarray(x)
    if is_cupy(xp):
        return x.get()
    if is_torch(xp):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def from_numpy(a: np.ndarray, like: Array) -> Array:
    """``a`` as an array of ``like``'s library on ``like``'s device (``a`` itself for NumPy)."""
    xp = get_namespace(like)
    if is_numpy(xp):
        return a
    return xp.asarray(a, device=device(like))
