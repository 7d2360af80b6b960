"""The quick development run (``-m "not slow"``): what tests/conftest.py leaves out names real tests,
and each long parametrisation keeps its quick cases."""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parents[1]


def _conftest():
    spec = importlib.util.spec_from_file_location("segloss_tests_conftest", TESTS / "conftest.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


CONFTEST = _conftest()


def _defined(path: Path) -> set[str]:
    return {n.name for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.FunctionDef)}


@pytest.mark.parametrize("prefix", [*CONFTEST.SLOW, *CONFTEST.SLOW_BUT])
def test_every_slow_entry_names_an_existing_test(prefix):
    """A renamed test must not silently fall back into the quick run (or out of the slow list)."""
    file, _, rest = prefix.partition("::")
    assert (TESTS / file).is_file(), prefix
    name = rest.split("[")[0]
    assert not name or name in _defined(TESTS / file), f"{prefix}: no test {name!r} in tests/{file}"


def test_long_parametrisations_keep_their_quick_cases():
    is_slow = CONFTEST.is_slow
    fused = "kernels/test_fused.py::test_gradcheck_fused_backward"
    assert not is_slow(f"{fused}[labels-dice_ce]") and not is_slow(f"{fused}[sigmoid-binary-dice_ce]")
    assert is_slow(f"{fused}[labels-dice]") and is_slow(f"{fused}[uint8-cross_entropy]")
    fresh = "test_build.py::test_torch_compile_fullgraph_on_the_first_call_of_a_fresh_process"
    assert not is_slow(f"{fresh}[dice]") and is_slow(f"{fresh}[dice_ce]") and is_slow(f"{fresh}[boundary]")
    cldice = "plugins/test_example_plugins.py::test_cldice_numpy_and_torch_agree"
    assert [i for i in range(8) if not is_slow(f"{cldice}[{'dice_' if i > 5 else ''}cldice-{i}]")] == [2, 4, 6]
    assert is_slow("torch_backend/test_distributed.py::test_anything") and not is_slow("core/test_spec.py::test_x")
