"""Serve calls into the emulated CUDA library (tests/kernels/emulated_cuda/driver.cpp) in a process of its own.

The library is built with ``-fsanitize=address,undefined``, and AddressSanitizer's runtime must be
the first library of the process: so it runs here, started by tests/kernels/test_emulated_cuda.py with
``LD_PRELOAD=$(g++ -print-file-name=libasan.so)``, never inside pytest. NumPy and ctypes only.

Protocol over stdin/stdout, each message a 8-byte little-endian length then a pickle:
request ``(function, args, outputs)`` where each of ``args`` is a NumPy array (passed as a
pointer), ``None`` (a null pointer) or ``(ctype_name, value)``, e.g. ``("int64", 3)``; ``outputs``
are the indices of the arrays to send back. Reply ``(return_code, {index: array})``. A sanitizer
report aborts the process: the test sees the end of the stream and reads the report from stderr.
"""

from __future__ import annotations

import ctypes
import pickle
import struct
import sys
from typing import Any, BinaryIO

import numpy as np

SCALARS = {"int32": ctypes.c_int, "int64": ctypes.c_int64, "float32": ctypes.c_float, "float64": ctypes.c_double}


def read_message(stream: BinaryIO) -> Any:
    header = stream.read(8)
    if len(header) < 8:
        return None
    (size,) = struct.unpack("<Q", header)
    return pickle.loads(stream.read(size))


def write_message(stream: BinaryIO, value: Any) -> None:
    data = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(struct.pack("<Q", len(data)) + data)
    stream.flush()


def call(library: ctypes.CDLL, function: str, args: list[Any], outputs: list[int]) -> tuple[int, dict[int, Any]]:
    converted: list[Any] = []
    arrays: dict[int, np.ndarray] = {}
    for index, arg in enumerate(args):
        if arg is None:
            converted.append(ctypes.c_void_p(None))
        elif isinstance(arg, np.ndarray):
            array = np.ascontiguousarray(arg)
            arrays[index] = array
            converted.append(ctypes.c_void_p(array.ctypes.data))
        else:
            kind, value = arg
            converted.append(SCALARS[kind](value))
    fn = getattr(library, function)
    fn.restype = ctypes.c_int
    rc = fn(*converted)
    return rc, {index: arrays[index] for index in outputs}


def main() -> None:
    library = ctypes.CDLL(sys.argv[1])
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    while (request := read_message(stdin)) is not None:
        write_message(stdout, call(library, *request))


if __name__ == "__main__":
    main()
