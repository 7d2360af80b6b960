"""Precomputed distance maps for a dataset of label volumes, and the patch crop that goes with them.

Boundary losses need the signed distance map φ of every training label map. On large 3D volumes
an exact EDT costs seconds per volume and class, so one computes the maps once, on the whole
volumes, and stores them next to the data (the boundary-loss authors' advice):

* :func:`precompute_distance_maps` reads label volumes (``.npy``, ``.npz``, ``.nii``,
  ``.nii.gz``), computes :func:`segloss_core.distance_maps.signed_distance_map` of each and writes
  ``out_dir/<stem>.npy`` of shape (C, *spatial), in parallel over files, resumably (finished
  outputs are skipped) and atomically (a temporary file renamed into place: an interrupted run
  never leaves a half-written ``<stem>.npy``). ``segloss distmap`` is the command-line face of it.
* :func:`random_patch` crops the same spatial window from the image, the label map and the
  precomputed map; :func:`load_distance_map` opens a stored map as a read-only memory map, so a
  crop reads only the window from disk.

Output layout: ``<stem>.npy`` holds a float array (float32 by default) of shape
(C, *spatial), class first, the spatial axes in the same order as the input array (for NIfTI:
the voxel-array order of ``np.asanyarray(nibabel.load(path).dataobj)``; nothing is reoriented).
``<stem>`` is the file name without ``.npy``/``.npz``/``.nii``/``.nii.gz``.

Spacing: an explicit ``spacing`` wins; otherwise a NIfTI file's voxel size comes from its header
(``header.get_zooms()``), and ``.npy``/``.npz`` files get 1 on every axis.

>>> import tempfile
>>> labels = np.zeros((4, 5), dtype=np.uint8)
>>> labels[1:3, 1:4] = 1
>>> with tempfile.TemporaryDirectory() as tmp:
...     np.save(f"{tmp}/case1.npy", labels)
...     report = precompute_distance_maps([f"{tmp}/case1.npy"], f"{tmp}/maps", 2, progress=False)
...     phi = np.load(f"{tmp}/maps/case1.npy")
>>> len(report.done), len(report.skipped), len(report.failed)
(1, 0, 0)
>>> phi.shape, phi.dtype
((2, 4, 5), dtype('float32'))
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import threading
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from ..arrays import to_numpy
from ..distance_maps import CONVENTIONS, check_spacing, signed_distance_map
from ..registry import registry

ENGINES = ("auto", "segloss", "scipy")

__all__ = [
    "LABEL_SUFFIXES",
    "RECORDED_PARAMETERS",
    "FailedInput",
    "LabelFileError",
    "OutputWriteError",
    "PrecomputeReport",
    "distance_map_path",
    "find_label_files",
    "load_distance_map",
    "parameters_path",
    "precompute_distance_maps",
    "random_patch",
    "read_label_volume",
]

LABEL_SUFFIXES = (".nii.gz", ".nii", ".npz", ".npy")
"""File types :func:`precompute_distance_maps` reads (longest first: ``.nii.gz`` before ``.nii``)."""

NIFTI_INSTALL_HINT = "pip install 'segloss-registry[nifti]'"
_MAX_LISTED_VALUES = 10


class LabelFileError(ValueError):
    """An input file that cannot be used as a label volume; the message names the file."""

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")

    def __reduce__(self) -> tuple[Any, ...]:  # picklable across worker processes
        return (type(self), (self.path, self.reason))


class FailedInput(NamedTuple):
    """One input that could not be processed, and why."""

    path: Path
    error: str


@dataclass
class PrecomputeReport:
    """What :func:`precompute_distance_maps` did, per input file (lists in input order).

    ``done``: maps computed and written by this run; ``skipped``: the output already existed
    (resumed run); ``failed``: (input, error message), nothing written for those.
    """

    out_dir: Path
    done: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)
    failed: list[FailedInput] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when no input failed."""
        return not self.failed

    def summary(self) -> str:
        """A few human-readable lines: the counts, then one line per failed input."""
        lines = [
            f"distmap: {len(self.done)} done, {len(self.skipped)} skipped (output exists), "
            f"{len(self.failed)} failed -> {self.out_dir}"
        ]
        if self.failed:
            lines.append("failed:")
            lines.extend(f"  {failure.path}: {failure.error}" for failure in self.failed)
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


# ---------------------------------------------------------------------------------------
# files: names, discovery, reading
# ---------------------------------------------------------------------------------------
def _label_suffix(path: Path) -> str | None:
    name = path.name.lower()
    return next((suffix for suffix in LABEL_SUFFIXES if name.endswith(suffix)), None)


def distance_map_path(input_path: str | os.PathLike[str], out_dir: str | os.PathLike[str]) -> Path:
    """Where the map of ``input_path`` is written: ``out_dir/<stem>.npy``.

    >>> distance_map_path("data/case_007.nii.gz", "maps").as_posix()
    'maps/case_007.npy'
    """
    path = Path(input_path)
    suffix = _label_suffix(path)
    stem = path.name[: -len(suffix)] if suffix else path.stem
    return Path(out_dir) / f"{stem}.npy"


def find_label_files(paths: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """Expand directories into their label files; keep files as given.

    A directory contributes every ``.npy``/``.npz``/``.nii``/``.nii.gz`` file directly inside
    it (not in sub-directories; hidden files, whose names start with ``.``, are left out),
    sorted by name. Any other path is taken as a file, whether or not it exists (a missing or
    unsupported file is reported as a failure of that input). Duplicates are dropped.
    """
    found: list[Path] = []
    seen: set[Path] = set()
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            candidates = sorted(
                child
                for child in path.iterdir()
                if child.is_file() and not child.name.startswith(".") and _label_suffix(child) is not None
            )
        else:
            candidates = [path]
        for candidate in candidates:
            key = candidate.resolve()
            if key not in seen:
                seen.add(key)
                found.append(candidate)
    return found


def _load_nifti(path: Path) -> tuple[np.ndarray, tuple[float, ...]]:
    try:
        import nibabel
    except ImportError:
        raise LabelFileError(path, f"reading NIfTI files needs nibabel: {NIFTI_INSTALL_HINT}") from None
    try:
        image = nibabel.load(path)
        data = np.asanyarray(image.dataobj)
        zooms = tuple(float(z) for z in image.header.get_zooms())
    except Exception as exc:  # any reader error means "unreadable file"
        raise LabelFileError(path, f"cannot read NIfTI file ({type(exc).__name__}: {exc})") from exc
    # a label volume saved with trailing length-1 axes (X, Y, Z, 1): drop those axes
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    return np.asarray(data), zooms[: data.ndim]


def _load_numpy(path: Path, suffix: str) -> np.ndarray:
    try:
        if suffix == ".npy":
            return np.load(path, allow_pickle=False)
        with np.load(path, allow_pickle=False) as archive:
            keys = list(archive.keys())
            if "labels" in keys:
                key = "labels"
            elif len(keys) == 1:
                key = keys[0]
            elif not keys:
                raise LabelFileError(path, "the .npz archive holds no array")
            else:
                raise LabelFileError(
                    path,
                    f"the .npz archive holds several arrays ({', '.join(keys)}) and none is named 'labels'; "
                    "store the label map under the key 'labels'",
                )
            return archive[key]
    except LabelFileError:
        raise
    except Exception as exc:  # any reader error means "unreadable file"
        raise LabelFileError(path, f"cannot read {suffix} file ({type(exc).__name__}: {exc})") from exc


def _integer_labels(data: np.ndarray, path: Path) -> np.ndarray:
    """The label volume as an integer array; floats are accepted when every value is integral."""
    if data.dtype == np.bool_:
        return data.astype(np.uint8)
    if np.issubdtype(data.dtype, np.integer):
        return data
    if np.issubdtype(data.dtype, np.floating):
        non_integral = ~np.isfinite(data) | (data != np.floor(data))
        if non_integral.any():
            values = np.unique(data[non_integral])[:_MAX_LISTED_VALUES]
            raise LabelFileError(
                path,
                f"labels are stored as {data.dtype} and not all values are integers "
                f"(e.g. {', '.join(str(v) for v in values.tolist())}); expected an integer label map",
            )
        return data  # integral floats: range-checked, then cast by the caller
    raise LabelFileError(path, f"labels must be integers (or integral floats), got dtype {data.dtype}")


def _check_label_range(labels: np.ndarray, num_classes: int, ignore_index: int | None, path: Path) -> None:
    bad = (labels < 0) | (labels >= num_classes)
    if ignore_index is not None:
        bad &= labels != ignore_index
    if bad.any():
        values = np.unique(labels[bad])
        listed = ", ".join(str(v) for v in values[:_MAX_LISTED_VALUES].tolist())
        more = f" and {values.size - _MAX_LISTED_VALUES} more" if values.size > _MAX_LISTED_VALUES else ""
        allowed = f"[0, {num_classes})" + (f" or ignore_index {ignore_index}" if ignore_index is not None else "")
        raise LabelFileError(path, f"labels outside {allowed}: {listed}{more} ({int(bad.sum())} voxels)")


def read_label_volume(
    path: str | os.PathLike[str],
    num_classes: int | None = None,
    *,
    ignore_index: int | None = None,
) -> tuple[np.ndarray, tuple[float, ...] | None]:
    """Read one label volume and its voxel size: ``(labels (*spatial) integer array, spacing)``.

    ``spacing`` is the NIfTI header's voxel size (first ``ndim`` zooms), or ``None`` for
    ``.npy``/``.npz`` files (no voxel size stored). For ``.npz`` the array under the key
    ``labels`` is used, else the only array. Float labels (common in NIfTI) are accepted when every
    value is integral and returned as int64. With ``num_classes``, labels outside
    ``[0, num_classes)`` other than ``ignore_index`` are rejected. Every problem raises
    :class:`LabelFileError` (a ``ValueError``) whose message names the file.

    NIfTI needs the optional dependency nibabel (``pip install 'segloss-registry[nifti]'``). The array is
    in the file's voxel order (not reoriented); trailing length-1 axes beyond the third, as in
    (X, Y, Z, 1), are dropped.
    """
    path = Path(path)
    if not path.is_file():
        raise LabelFileError(path, "no such file" if not path.exists() else "not a file")
    suffix = _label_suffix(path)
    if suffix is None:
        raise LabelFileError(path, f"unsupported file type; expected one of {', '.join(LABEL_SUFFIXES)}")
    header_spacing: tuple[float, ...] | None = None
    if suffix in (".nii", ".nii.gz"):
        data, header_spacing = _load_nifti(path)
    else:
        data = _load_numpy(path, suffix)
    if data.ndim < 1 or data.ndim > 3:
        hint = " (one sample per file: if it holds a batch of one, save labels[0])" if data.ndim == 4 else ""
        raise LabelFileError(
            path, f"expected one label volume with 1 to 3 spatial dims, got shape {tuple(data.shape)}{hint}"
        )
    if data.size == 0:
        raise LabelFileError(path, f"the label volume is empty (shape {tuple(data.shape)})")
    labels = _integer_labels(data, path)
    if num_classes is not None:
        _check_label_range(labels, num_classes, ignore_index, path)
    if np.issubdtype(labels.dtype, np.floating):
        labels = labels.astype(np.int64)
    return labels, header_spacing


# ---------------------------------------------------------------------------------------
# one file: read, compute, write atomically (runs in a worker process)
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Task:
    input_path: Path
    output_path: Path
    num_classes: int
    spacing: float | tuple[float, ...] | None
    convention: str
    dtype: str
    ignore_index: int | None
    engine: str = "scipy"
    threads: int | None = None

    def parameters(self) -> dict[str, Any]:
        """What the map depends on (compared on resume: ``RECORDED_PARAMETERS``), plus provenance."""
        from .. import __version__

        spacing = self.spacing
        return {
            "num_classes": self.num_classes,
            "convention": self.convention,
            "spacing": "file" if spacing is None else list(spacing) if isinstance(spacing, tuple) else spacing,
            "ignore_index": self.ignore_index,
            "normalize": None,
            "dtype": np.dtype(self.dtype).name,
            "engine": self.engine,
            "segloss_version": __version__,
        }


RECORDED_PARAMETERS = ("num_classes", "convention", "spacing", "ignore_index", "normalize", "dtype")
"""The parameters a stored map must share with a run for that run to skip it (the record also
holds ``engine``, ``segloss_version``, ``voxel_size`` and ``input``, which are not compared: the
engines agree to float32 rounding)."""


def _distance_map_of_volume(
    labels: np.ndarray,
    num_classes: int,
    spacing: tuple[float, ...],
    convention: str,
    ignore_index: int | None,
    dtype: np.dtype[Any],
    engine: str = "scipy",
) -> np.ndarray:
    """``signed_distance_map(labels[None], num_classes, spacing, ...)[0]`` cast to ``dtype``.

    ``engine="segloss"``: the segloss CPU kernels through torch, every class from one multi-label
    pass (float32, exact to float32 rounding; parallel over lines). ``engine="scipy"``: the float64
    reference, one class at a time (below).

    Computing all classes at once holds several float64 (C, *spatial) arrays; one class at a time
    holds a few (*spatial) ones plus the output in ``dtype``, which matters for large 3D volumes
    with many classes. Each class map is the reference call on the binary map "class c or not",
    with "not" ignored (voxels of ``ignore_index`` belong to no class): the same mask, the same
    EDT, the same numbers (tested against the all-classes call).
    """
    if engine == "segloss":
        import torch

        phi = signed_distance_map(  # dispatched to the torch backend's kernels
            torch.from_numpy(np.ascontiguousarray(labels))[None],
            num_classes,
            spacing,
            convention=convention,
            ignore_index=ignore_index,
        )[0]
        return to_numpy(phi).astype(dtype, copy=False)
    out = np.empty((num_classes, *labels.shape), dtype=dtype)
    for c in range(num_classes):
        in_class = labels == c if ignore_index != c else np.zeros(labels.shape, dtype=bool)
        binary = in_class.astype(np.uint8)[None]
        out[c] = signed_distance_map(binary, 2, spacing, convention=convention, ignore_index=0)[0, 1]
    return out


def parameters_path(map_path: str | os.PathLike[str]) -> Path:
    """The parameter record stored beside a map: ``<stem>.npy.json``.

    >>> parameters_path("maps/case_007.npy").as_posix()
    'maps/case_007.npy.json'
    """
    path = Path(map_path)
    return path.with_name(path.name + ".json")


def _write_atomically(array: np.ndarray, output_path: Path, record: dict[str, Any]) -> None:
    """Write ``array`` to ``output_path`` (.npy) and ``record`` to its parameter record, both
    through temporary files renamed into place.

    The temporary files (``.<name>.<pid>-<random>.tmp``, in the same directory so the renames
    stay on one file system) are removed on any error or interrupt. Order: both temporaries
    complete and flushed; an older map of that name removed; the record renamed; the map renamed
    last. So a map name exists only once its content is complete and its record beside it
    describes it: an interruption at any point leaves at worst no map (computed again next run),
    never an old map next to a new record.
    """
    token = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    record_path = parameters_path(output_path)
    tmp_map = output_path.with_name(f".{output_path.name}.{token}.tmp")
    tmp_record = record_path.with_name(f".{record_path.name}.{token}.tmp")
    nbytes = array.nbytes + 128  # the .npy header is one 64-byte-aligned line
    try:
        with open(tmp_map, "xb") as handle:
            np.save(handle, array, allow_pickle=False)
            handle.flush()
            os.fsync(handle.fileno())
        with open(tmp_record, "x", encoding="utf-8") as handle:
            json.dump(record, handle, indent=1, sort_keys=True)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        output_path.unlink(missing_ok=True)
        os.replace(tmp_record, record_path)
        os.replace(tmp_map, output_path)
    except OSError as exc:
        raise OutputWriteError(output_path, _write_error_reason(exc, output_path, nbytes)) from exc
    finally:
        tmp_map.unlink(missing_ok=True)
        tmp_record.unlink(missing_ok=True)


class OutputWriteError(OSError):
    """A map that could not be written; the message names the output file and the cause in words."""

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(reason)

    def __reduce__(self) -> tuple[Any, ...]:  # picklable across worker processes
        return (type(self), (self.path, self.reason))


_MIB = 1 << 20


def _write_error_reason(exc: OSError, path: Path, nbytes: int) -> str:
    """``exc`` (raised while writing ``path``, about ``nbytes`` long) in words.

    The errno says it when there is one; NumPy's short-write error (``N requested and M written``)
    has none, so then the free space of the file system and this process's file-size limit
    (``ulimit -f``, RLIMIT_FSIZE) are looked at.
    """
    where = path.parent
    code = exc.errno
    if code is None:
        code = _probe_write_limits(where, nbytes)
    if code in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):
        kind = "the disk is full" if code == errno.ENOSPC else "the disk quota is exceeded"
        free = _size(_free_bytes(where))
        return f"cannot write {path}: {kind} (the map needs {_size(nbytes)}, {free} free in {where})"
    if code == errno.EFBIG:
        limit = _file_size_limit()
        shown = f"{limit} bytes" if limit is not None else "a limit"
        return (
            f"cannot write {path}: the map ({nbytes} bytes) exceeds this process's file-size limit of {shown} "
            "(ulimit -f); raise the limit"
        )
    if code in (errno.EACCES, errno.EPERM):
        return f"cannot write {path}: permission denied (the directory {where} is not writable for this user)"
    if code == errno.EROFS:
        return f"cannot write {path}: the file system of {where} is read-only"
    return f"cannot write {path}: {exc.strerror or exc}"


def _size(nbytes: int | None) -> str:
    if nbytes is None:
        return "an unknown amount"
    return f"{nbytes / _MIB:.1f} MiB" if nbytes >= _MIB else f"{nbytes / 1024:.1f} KiB"


def _free_bytes(directory: Path) -> int | None:
    try:
        stats = os.statvfs(directory)
    except (AttributeError, OSError):  # no statvfs (Windows) or the directory is gone
        return None
    return stats.f_bavail * stats.f_frsize


def _file_size_limit() -> int | None:
    try:
        import resource
    except ImportError:  # Windows
        return None
    soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    return None if soft == resource.RLIM_INFINITY else int(soft)


def _probe_write_limits(directory: Path, nbytes: int) -> int | None:
    """The errno a short write most likely stands for (``None`` when nothing explains it)."""
    limit = _file_size_limit()
    if limit is not None and nbytes > limit:
        return errno.EFBIG
    free = _free_bytes(directory)
    if free is not None and free < nbytes:
        return errno.ENOSPC
    return None


def _process(task: _Task) -> str | None:
    """Compute and write one map; ``None`` on success, else the error message (never raises)."""
    try:
        labels, header_spacing = read_label_volume(task.input_path, task.num_classes, ignore_index=task.ignore_index)
        spacing = task.spacing if task.spacing is not None else header_spacing
        try:
            sampling = check_spacing(spacing, labels.ndim)
        except (TypeError, ValueError) as exc:
            source = "explicit spacing" if task.spacing is not None else "voxel size in the NIfTI header"
            raise LabelFileError(task.input_path, f"invalid {source}: {exc}") from exc
        phi = _distance_map_of_volume(
            labels, task.num_classes, sampling, task.convention, task.ignore_index, np.dtype(task.dtype), task.engine
        )
        record = {**task.parameters(), "voxel_size": list(sampling), "input": task.input_path.name}
        _write_atomically(phi, task.output_path, record)
    except (LabelFileError, OutputWriteError) as exc:
        return exc.reason
    except Exception as exc:  # noqa: BLE001 - one bad file must not stop the others
        return f"{type(exc).__name__}: {exc}"
    return None


def _existing_output_problem(output_path: Path, wanted: dict[str, Any]) -> str | None:
    """Why an existing output cannot count as done for a run with parameters ``wanted`` (``None``
    when it can): unreadable, another shape or dtype, no parameter record, or a record whose
    ``RECORDED_PARAMETERS`` differ."""
    rerun = "pass --overwrite (overwrite=True) to recompute it"
    try:
        stored = np.load(output_path, mmap_mode="r", allow_pickle=False)
        shape, stored_dtype = stored.shape, stored.dtype
        del stored
    except Exception as exc:  # noqa: BLE001 - any reader error means "not a finished map"
        return f"existing output {output_path} is unreadable ({type(exc).__name__}: {exc}); {rerun}"
    if len(shape) < 2 or shape[0] != wanted["num_classes"] or stored_dtype.name != wanted["dtype"]:
        return (
            f"existing output {output_path} has shape {shape} and dtype {stored_dtype}, expected "
            f"{wanted['num_classes']} classes and {wanted['dtype']} (computed with other settings?); {rerun}"
        )
    record_path = parameters_path(output_path)
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return (
            f"existing output {output_path} has no parameter record {record_path.name} (written by an older "
            f"segloss?), so it cannot be told apart from a map made with other settings; {rerun}"
        )
    except (OSError, ValueError) as exc:
        return f"the parameter record {record_path} is unreadable ({type(exc).__name__}: {exc}); {rerun}"
    differ = [name for name in RECORDED_PARAMETERS if record.get(name) != wanted[name]]
    if differ:
        stored_values = ", ".join(f"{name}={record.get(name)!r}" for name in differ)
        wanted_values = ", ".join(f"{name}={wanted[name]!r}" for name in differ)
        return f"existing output {output_path} was made with {stored_values}; this run asks {wanted_values}; {rerun}"
    return None


# ---------------------------------------------------------------------------------------
# progress
# ---------------------------------------------------------------------------------------
class _Progress:
    """tqdm when importable, else a plain counter on stderr; nothing when disabled."""

    def __init__(self, total: int, initial: int, enabled: bool) -> None:
        self.total, self.count, self.enabled = total, initial, enabled
        self._bar: Any = None
        if not enabled:
            return
        try:
            from tqdm import tqdm
        except ImportError:
            self._show()
        else:
            self._bar = tqdm(total=total, initial=initial, desc="distmap", unit="file", file=sys.stderr)

    def _show(self) -> None:
        end = "" if sys.stderr.isatty() else "\n"
        print(f"\rdistmap: {self.count}/{self.total} files", end=end, file=sys.stderr, flush=True)

    def update(self) -> None:
        self.count += 1
        if self._bar is not None:
            self._bar.update(1)
        elif self.enabled:
            self._show()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self.enabled and sys.stderr.isatty():
            print(file=sys.stderr)


# ---------------------------------------------------------------------------------------
# the dataset tool
# ---------------------------------------------------------------------------------------
def _resolve_engine(engine: str, out_dtype: np.dtype[Any]) -> str:
    """The engine to use: ``segloss`` needs the built CPU kernels; ``auto`` falls back to scipy."""
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if engine == "scipy" or (engine == "auto" and out_dtype == np.float64):
        return "scipy"
    if engine == "segloss" and out_dtype == np.float64:
        raise ValueError(
            "engine='segloss' computes float32 maps, so dtype float64 would only store float32 values: use "
            "engine='scipy' (the float64 reference; engine='auto' picks it for float64) or dtype float32"
        )
    try:
        import torch

        kernels = registry().distance_map_kernels(torch.zeros(1, dtype=torch.uint8))
        why_not = "no backend has distance-map kernels for torch tensors" if kernels is None else kernels.unavailable()
    except Exception as exc:  # noqa: BLE001 - torch missing or broken: no kernels
        why_not = f"{type(exc).__name__}: {exc}"
    built, reason = why_not is None, "" if why_not is None else f": {why_not}"
    if built:
        return "segloss"
    if engine == "segloss":
        raise ValueError(f"engine='segloss' needs the segloss torch kernels, which are not available{reason}")
    return "scipy"


def _check_arguments(
    num_classes: int,
    spacing: float | Sequence[float] | None,
    convention: str,
    workers: int | None,
    dtype: str | np.dtype[Any],
    ignore_index: int | None,
) -> tuple[float | tuple[float, ...] | None, np.dtype[Any]]:
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {', '.join(CONVENTIONS)}, got {convention!r}")
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise ValueError(f"workers must be a positive int or None, got {workers!r}")
    if ignore_index is not None and (isinstance(ignore_index, bool) or not isinstance(ignore_index, (int, np.integer))):
        raise ValueError(f"ignore_index must be an int or None, got {ignore_index!r}")
    try:
        out_dtype = np.dtype(dtype)
    except TypeError as exc:
        raise ValueError(f"dtype must be a floating dtype such as 'float32', got {dtype!r}") from exc
    if out_dtype.kind != "f":
        raise ValueError(f"dtype must be a floating dtype such as 'float32', got {out_dtype}")
    if spacing is None:
        return None, out_dtype
    if isinstance(spacing, (int, float)) and not isinstance(spacing, bool):
        return check_spacing(spacing, 1)[0], out_dtype  # one value for every axis of every file
    values = tuple(spacing)
    return check_spacing(values, len(values)), out_dtype


def precompute_distance_maps(
    inputs: Iterable[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    num_classes: int,
    *,
    spacing: float | Sequence[float] | None = None,
    convention: str = "boundary_loss",
    workers: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
    dtype: str | np.dtype[Any] = "float32",
    ignore_index: int | None = None,
    engine: str = "auto",
) -> PrecomputeReport:
    """Compute and store the signed distance map of every label volume in ``inputs``.

    For each input (a file, or a directory meaning the label files directly inside it, see
    :func:`find_label_files`), writes ``out_dir/<stem>.npy`` = ``signed_distance_map(labels[None],
    num_classes, spacing, convention=convention, ignore_index=ignore_index)[0]`` cast to
    ``dtype``: shape (C, *spatial), spatial axes in the input array's order.

    - Inputs: ``.npy``; ``.npz`` (key ``labels``, else the only array); ``.nii``/``.nii.gz``
      (nibabel, optional: ``pip install 'segloss-registry[nifti]'``). One sample per file, 1–3 spatial
      dims, integer labels in ``[0, num_classes)`` or ``ignore_index``; float labels are
      accepted when every value is integral.
    - ``spacing``: a number (every axis) or one value per axis. Given, it is used for every file,
      NIfTI included (explicit wins over the header); omitted, NIfTI files use the header's voxel
      size and ``.npy``/``.npz`` files 1.
    - Each map has a parameter record beside it, ``<stem>.npy.json`` (:func:`parameters_path`):
      num_classes, convention, spacing (``"file"``: the header or 1), ignore_index, normalize,
      dtype, plus the engine, the segloss version, the voxel size used and the input's name.
    - Resumable: an input whose output exists is skipped (``overwrite=True`` recomputes) when
      the stored map has ``num_classes`` classes and ``dtype`` and its record has the same
      ``RECORDED_PARAMETERS`` as this run; otherwise (other settings, or no record) that input
      is reported as failed with a message naming ``--overwrite``, and the old map is kept.
    - Atomic: each map and its record are written to temporary files in ``out_dir`` and renamed
      into place, the record first, so an interrupted run leaves no partial ``<stem>.npy`` and
      no map beside a record of other settings (at worst a stray ``.*.tmp`` file after a hard
      kill, which is never taken as done and can be deleted).
    - ``engine``: ``"segloss"`` computes every class from one multi-label pass of the segloss CPU
      kernels (torch; float32, exact to float32 rounding, 20–40× faster than scipy on 3D
      volumes, see docs/distance_maps.md); ``"scipy"`` is the float64 reference, class by class;
      ``"auto"`` (default) takes segloss when its kernels are built and ``dtype`` is not float64
      (``engine="segloss"`` with float64 is a ``ValueError``: the kernels compute float32).
    - Parallel: the scipy engine over files with a process pool of ``workers`` processes (default
      ``os.cpu_count()``, never more than the files to compute); the segloss engine is already
      parallel inside a volume, so it runs in this process unless ``workers`` > 1 asks for a
      (spawned) pool, the CPU threads then shared between the workers. ``workers=1`` runs in this
      process. Each worker holds one volume's maps in memory: lower ``workers`` when memory is
      short.
    - A file that fails (unreadable, wrong shape or dtype, labels out of range, a full disk, a
      file-size limit, a read-only directory, …) is listed in ``report.failed`` with the reason
      in words; the others are still processed and nothing is written for it. A worker process
      that dies (killed, out of memory) fails only the file it was computing, and a new worker
      takes its place. Workers end when the command ends, however it ends (SIGKILL included):
      no worker writes a map after its command has died.

    Raises ``ValueError`` before any work for invalid arguments, no input files, two inputs that
    would write the same output name, or an output that would overwrite its own input.

    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     np.savez(f"{tmp}/a.npz", labels=np.array([[0, 1, 1, 0]]))
    ...     np.save(f"{tmp}/b.npy", np.array([0, 3]))  # 3 is not a class of 2
    ...     report = precompute_distance_maps([tmp], f"{tmp}/out", 2, progress=False, workers=1)
    ...     again = precompute_distance_maps([tmp], f"{tmp}/out", 2, progress=False, workers=1)
    >>> [p.name for p in report.done], [f.path.name for f in report.failed], report.ok
    (['a.npz'], ['b.npy'], False)
    >>> [p.name for p in again.skipped]
    ['a.npz']
    >>> print(report.failed[0].error)
    labels outside [0, 2): 3 (1 voxels)
    """
    checked_spacing, out_dtype = _check_arguments(num_classes, spacing, convention, workers, dtype, ignore_index)
    engine = _resolve_engine(engine, out_dtype)
    out_dir = Path(out_dir)
    raw_inputs = [Path(p) for p in inputs]
    if out_dir.exists() and any(p.is_dir() and p.resolve() == out_dir.resolve() for p in raw_inputs):
        raise ValueError(f"the output directory {out_dir} is also an input directory; choose another --out")
    files = find_label_files(raw_inputs)
    if not files:
        raise ValueError(
            f"no input files (looked for {', '.join(LABEL_SUFFIXES)} in {', '.join(map(str, raw_inputs)) or 'nothing'})"
        )
    outputs = [distance_map_path(path, out_dir) for path in files]
    owners: dict[Path, Path] = {}
    for path, output in zip(files, outputs, strict=True):
        if output in owners:
            raise ValueError(f"{owners[output]} and {path} would both write {output}; rename one of them")
        owners[output] = path
        if output.resolve() == path.resolve():
            raise ValueError(f"the output of {path} would overwrite the input itself; choose another output directory")
    out_dir.mkdir(parents=True, exist_ok=True)

    tasks = {
        index: _Task(
            input_path=files[index],
            output_path=outputs[index],
            num_classes=int(num_classes),
            spacing=checked_spacing,
            convention=convention,
            dtype=out_dtype.str,
            ignore_index=None if ignore_index is None else int(ignore_index),
            engine=engine,
        )
        for index in range(len(files))
    }
    errors: dict[int, str | None] = {}  # index -> None (written now) or why it failed
    skipped: set[int] = set()
    pending: list[int] = []
    for index, output in enumerate(outputs):
        if overwrite or not output.exists():
            pending.append(index)
            continue
        problem = _existing_output_problem(output, tasks[index].parameters())
        if problem is None:
            skipped.add(index)
        else:
            errors[index] = problem
    tasks = {index: tasks[index] for index in pending}
    bar = _Progress(total=len(files), initial=len(files) - len(pending), enabled=progress)
    try:
        default_workers = 1 if engine == "segloss" else os.cpu_count() or 1
        pool_size = min(workers or default_workers, len(pending))
        if pool_size <= 1:
            for index, task in tasks.items():
                errors[index] = _process(task)
                bar.update()
        else:
            if engine == "segloss":  # share the CPU threads between the workers
                threads = max(1, (os.cpu_count() or 1) // pool_size)
                tasks = {index: replace(task, threads=threads) for index, task in tasks.items()}
            _run_pool(tasks, pool_size, errors, bar, spawn=engine == "segloss")
    finally:
        bar.close()

    report = PrecomputeReport(out_dir=out_dir)
    for index, path in enumerate(files):
        if index in skipped:
            report.skipped.append(path)
        elif errors[index] is None:
            report.done.append(path)
        else:
            report.failed.append(FailedInput(path, str(errors[index])))
    return report


# ---------------------------------------------------------------------------------------
# the worker pool: workers die with the command, a dead worker costs only its own file
# ---------------------------------------------------------------------------------------
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
_PARENT_POLL_SECONDS = 0.5


def _die_with_parent(command_pid: int) -> None:
    """Make this worker end when the command that started it ends, however it ends (SIGKILL too).

    Linux: ``prctl(PR_SET_PDEATHSIG, SIGTERM)``, the kernel's own notice. Everywhere (and as a
    second line on Linux): a daemon thread that polls the parent pid and sends this process
    SIGTERM when the worker has been re-parented. SIGTERM raises ``SystemExit`` in the main
    thread (between two Python operations, so at worst after the running EDT call), which
    removes the temporary files: a worker whose command died writes no map.
    """
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        except (OSError, AttributeError):  # no libc symbol: the watchdog below still runs
            pass
    parent = os.getppid()
    try:
        os.kill(command_pid, 0)  # the command died before this worker got here
    except ProcessLookupError:
        os._exit(1)
    except PermissionError:  # pragma: no cover - a pid reused by another user: the command is gone
        os._exit(1)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(_PARENT_POLL_SECONDS)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="segloss-parent-watchdog", daemon=True).start()


def _raise_on_signal(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def _worker_main(conn: multiprocessing.connection.Connection, command_pid: int) -> None:
    """A worker: receive a task, send back ``_process(task)``; ``None`` ends it.

    SIGTERM raises (the temporary files are removed); SIGINT is ignored, the command stops the
    workers itself on Ctrl-C.
    """
    signal.signal(signal.SIGTERM, _raise_on_signal)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent(command_pid)
    threads: int | None = None
    while True:
        try:
            task = conn.recv()
        except EOFError:  # the command closed the pipe
            return
        if task is None:
            return
        if task.threads is not None and task.threads != threads:
            import torch

            torch.set_num_threads(task.threads)
            threads = task.threads
        conn.send(_process(task))


def _death_reason(exitcode: int | None) -> str:
    """``"worker process died while computing this map (killed by SIGKILL ...)"``."""
    if exitcode is not None and exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        how = f"killed by {name}"
        if -exitcode == getattr(signal, "SIGKILL", 9):
            how += "; out of memory? lower --workers"
    else:
        how = f"exit status {exitcode}"
    return f"worker process died while computing this map ({how}); the other files were not affected"


@dataclass
class _Worker:
    process: Any  # multiprocessing.Process of the chosen context
    conn: multiprocessing.connection.Connection
    index: int | None = None  # the task it is computing


def _run_pool(
    tasks: dict[int, _Task], pool_size: int, errors: dict[int, str | None], bar: _Progress, spawn: bool = False
) -> None:
    """Compute ``tasks`` in ``pool_size`` worker processes, one task per worker at a time.

    The command knows which file each worker holds, so a worker that dies (killed, out of
    memory, a crash in a library) fails exactly that file, with the reason; a new worker takes
    its place and the other files go on. An exception here (Ctrl-C) terminates the workers
    (SIGTERM: they remove their temporary files) before it propagates.
    """
    # torch's thread pools do not survive fork(): the segloss engine's workers are spawned. fork is
    # chosen explicitly elsewhere so a worker's parent is the command (not a forkserver)
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("spawn" if spawn or "fork" not in methods else "fork")
    queue = list(tasks.items())
    queue.reverse()  # pop() from the end: input order
    workers: list[_Worker] = []

    def start() -> _Worker:
        ours, theirs = context.Pipe()
        process = context.Process(
            target=_worker_main, args=(theirs, os.getpid()), name="segloss-distmap-worker", daemon=True
        )
        process.start()
        theirs.close()
        worker = _Worker(process, ours)
        workers.append(worker)
        return worker

    def hand_out(worker: _Worker) -> None:
        """Give ``worker`` the next file, or retire it when there is none."""
        while queue:
            index, task = queue.pop()
            try:
                worker.conn.send(task)
            except OSError:  # it died after its last answer: the file goes back, a new worker takes it
                queue.append((index, task))
                _bury(worker, workers)
                worker = start()
                continue
            worker.index = index
            return
        worker.index = None
        _retire(worker)

    try:
        for _ in range(min(pool_size, len(queue))):
            hand_out(start())
        while busy := [w for w in workers if w.index is not None]:
            ready = set(multiprocessing.connection.wait([w.conn for w in busy] + [w.process.sentinel for w in busy]))
            for worker in busy:
                if worker.conn not in ready and worker.process.sentinel not in ready:
                    continue
                index = worker.index
                assert index is not None
                bar.update()
                try:
                    if worker.conn not in ready:
                        raise EOFError
                    errors[index] = worker.conn.recv()
                except (EOFError, OSError):  # it died: this file, and only this one, failed
                    errors[index] = _death_reason(_bury(worker, workers))
                    if queue:
                        hand_out(start())
                    continue
                hand_out(worker)
    except BaseException:  # interrupted: stop the workers (they remove their temporary files)
        for worker in workers:
            if worker.process.is_alive():
                worker.process.terminate()
        for worker in workers:
            worker.process.join(timeout=5)
            if worker.process.is_alive():
                worker.process.kill()
        raise
    for worker in workers:
        worker.process.join()


def _retire(worker: _Worker) -> None:
    """Tell a worker to end (it exits after reading ``None``) and close our end of its pipe."""
    with contextlib.suppress(OSError):  # already gone
        worker.conn.send(None)
    worker.conn.close()


def _bury(worker: _Worker, workers: list[_Worker]) -> int | None:
    """Collect a dead worker; its exit code."""
    worker.process.join()
    worker.conn.close()
    workers.remove(worker)
    return worker.process.exitcode


# ---------------------------------------------------------------------------------------
# training-time helpers
# ---------------------------------------------------------------------------------------
def load_distance_map(path: str | os.PathLike[str], mmap: bool = True) -> np.ndarray:
    """Open a stored map (C, *spatial); by default as a read-only memory map (``mmap_mode="r"``).

    A memory map reads from disk only what is used: crop it with :func:`random_patch` and only
    the patch is read. ``mmap=False`` loads the whole array.
    """
    return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)


def random_patch(
    arrays: Sequence[Any],
    patch_size: Sequence[int],
    rng: np.random.Generator | int | None = None,
    start: Sequence[int] | None = None,
) -> tuple[Any, ...]:
    """Crop the same spatial window from several arrays of the same spatial shape.

    The LAST ``len(patch_size)`` axes of every array are the spatial axes; any leading axes
    (channels of the image, classes of the distance map) are kept whole. So one call crops an
    image (channels, *spatial) or (*spatial), its label map (*spatial) and its precomputed map
    (C, *spatial) consistently. The window starts at ``start`` (one index per spatial axis) or,
    if omitted, at a uniformly random position drawn from ``rng`` (a ``numpy.random.Generator``,
    a seed, or ``None`` for fresh entropy) such that it lies inside the volume. Returns a tuple
    of views, in the order given (NumPy arrays, memory maps, and other arrays that support
    ``a[..., i:j, k:l]`` such as torch tensors); copy them (``np.ascontiguousarray``) if needed.

    Why crop a map precomputed on the whole volume rather than compute the map of the cropped
    labels: the distance at a voxel is the distance to the nearest boundary, which may lie
    outside the patch. Computed on the crop, distances near the patch border are wrong (too
    large, or the patch border acts as a boundary), and a class present in the volume but not
    in the patch gets no signal at all; cropped from the whole-volume map, every voxel of the
    patch carries its true distance. It is also cheaper: one EDT per volume, not one per patch.

    Raises ``ValueError`` when the arrays' spatial shapes differ, an array has fewer axes than
    ``patch_size``, the patch is larger than the volume (or not positive) on some axis, or
    ``start`` puts the window outside the volume.

    >>> image = np.arange(2 * 6 * 8).reshape(2, 6, 8)  # (channels, H, W)
    >>> labels = np.zeros((6, 8), dtype=np.int64)  # (H, W)
    >>> phi = np.zeros((3, 6, 8))  # (C, H, W)
    >>> img_p, lab_p, phi_p = random_patch((image, labels, phi), (4, 4), start=(1, 2))
    >>> img_p.shape, lab_p.shape, phi_p.shape
    ((2, 4, 4), (4, 4), (3, 4, 4))
    >>> int(img_p[0, 0, 0]) == int(image[0, 1, 2])
    True
    """
    if hasattr(arrays, "shape"):
        raise TypeError("arrays must be a sequence of arrays, e.g. (image, labels, distance_map), not one array")
    arrays = tuple(arrays)
    if not arrays:
        raise ValueError("random_patch needs at least one array")
    if isinstance(patch_size, (int, np.integer)) or not isinstance(patch_size, Sequence):
        raise TypeError(f"patch_size must be a sequence with one size per spatial axis, got {patch_size!r}")
    size = tuple(int(s) for s in patch_size)
    ndim = len(size)
    if ndim == 0:
        raise ValueError("patch_size must have at least one spatial axis")
    shapes = [tuple(int(s) for s in a.shape) for a in arrays]
    for position, shape in enumerate(shapes):
        if len(shape) < ndim:
            raise ValueError(
                f"array {position} has shape {shape}, fewer axes than the {ndim} spatial axes of patch_size {size}"
            )
    spatial = shapes[0][len(shapes[0]) - ndim :]
    if any(shape[len(shape) - ndim :] != spatial for shape in shapes):
        raise ValueError(f"the arrays' spatial shapes (last {ndim} axes) differ: {', '.join(str(s) for s in shapes)}")
    for axis, (p, n) in enumerate(zip(size, spatial, strict=True)):
        if p < 1:
            raise ValueError(f"patch_size must be positive, got {size}")
        if p > n:
            raise ValueError(f"patch {size} is larger than the volume {spatial} on spatial axis {axis} ({p} > {n})")
    if start is None:
        generator = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
        corner = tuple(int(generator.integers(0, n - p + 1)) for p, n in zip(size, spatial, strict=True))
    else:
        corner = tuple(int(s) for s in start)
        if len(corner) != ndim:
            raise ValueError(f"start {corner} must have one index per spatial axis ({ndim})")
        for axis, (s, p, n) in enumerate(zip(corner, size, spatial, strict=True)):
            if s < 0 or s + p > n:
                raise ValueError(
                    f"start {corner} puts the patch {size} outside the volume {spatial} on spatial axis {axis}"
                )
    window = (Ellipsis, *(slice(s, s + p) for s, p in zip(corner, size, strict=True)))
    return tuple(a[window] for a in arrays)
