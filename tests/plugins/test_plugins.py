"""The plugin contract: entry points, hooks, broken plugins, throwaway registrations."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest

import segloss_core
from segloss_core import Backend, LossSpec, get_loss, hookimpl, list_backends, plugin_manager
from segloss_core import plugins as plugin_loading
from segloss_core.arrays import get_namespace, is_numpy
from segloss_core.numpy_backend import NumpyLoss
from segloss_core.registry import BackendUnavailableError, Registry, UnsupportedLossError


class EchoBackend(Backend):
    """A throwaway backend: the NumPy reference under another name."""

    name = "echo"
    description = "test backend"

    def build(self, plan, **options):
        return NumpyLoss(plan)


class BackendsPlugin:
    """A throwaway plugin registering ``backends`` (pluggy takes each plugin object once: make one per use)."""

    def __init__(self, *backends: Backend) -> None:
        self.backends = backends

    @hookimpl
    def segloss_register_backends(self, register):
        for backend in self.backends:
            register(backend)


def test_throwaway_backend_through_the_plugin_manager(registered, rng):
    registered(BackendsPlugin(EchoBackend()), "echo-plugin")
    loss = get_loss("dice", backend="echo", include_background=False)
    x = rng.normal(size=(2, 3, 4, 5))
    y = rng.integers(0, 3, size=(2, 4, 5))
    reference = get_loss("dice", backend="numpy", include_background=False)
    assert float(loss(x, y)) == float(reference(x, y))
    assert "echo" in [b.name for b in list_backends()]


def test_unregistering_removes_the_backend(registered):
    pm = plugin_manager()
    pm.register(BackendsPlugin(EchoBackend()), name="echo-temp")
    assert "echo" in [b.name for b in list_backends()]
    pm.unregister(name="echo-temp")
    assert "echo" not in [b.name for b in list_backends()]


def test_builtin_backends_come_from_entry_points():
    eps = {ep.name: ep.value for ep in metadata.entry_points(group="segloss")}
    assert eps["numpy"] == "segloss_core.numpy_backend"
    assert eps["torch"] == "segloss_torch.plugin"
    origins = {b.name: b.plugin for b in list_backends()}
    assert origins["numpy"] == "numpy" and origins["torch"] == "torch"


def test_hookimpl_is_reexported():
    assert segloss_core.hookimpl is plugin_loading.hookspecs.hookimpl


class GarbagePlugin:
    @hookimpl
    def segloss_register_backends(self, register):
        register("not a backend")
        return 42


class CrashingPlugin:
    @hookimpl
    def segloss_register_losses(self, register):
        raise RuntimeError("boom")


def test_garbage_and_crashes_become_warnings_naming_the_plugin(registered):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        registered(GarbagePlugin(), "garbage")
        registered(CrashingPlugin(), "crasher")
        names = [b.name for b in list_backends()]
    messages = [str(w.message) for w in caught]
    assert any("'garbage'" in m and "not a named Backend" in m for m in messages)
    assert any("'garbage'" in m and "returned int 42" in m for m in messages)
    assert any("'crasher'" in m and "RuntimeError: boom" in m for m in messages)
    assert "numpy" in names and "torch" in names  # the others still work
    assert get_loss("dice", backend="numpy") is not None


class DuplicateLossPlugin:
    @hookimpl
    def segloss_register_losses(self, register):
        from segloss_core.losses.region import DICE

        register(LossSpec(**{**DICE.__dict__, "summary": "impostor"}))


def test_builtin_loss_override_is_refused(registered):
    with pytest.warns(plugin_loading.SeglossPluginWarning, match="loss 'dice' is already registered"):
        registered(DuplicateLossPlugin(), "impostor")
        assert segloss_core.registry().loss("dice").summary != "impostor"


class DeliberateOverridePlugin:
    @hookimpl
    def segloss_register_losses(self, register):
        from segloss_core.losses.region import DICE

        register(LossSpec(**{**DICE.__dict__, "summary": "a patched dice"}), override=True)


def test_explicit_override_replaces_a_builtin_loss(registered):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", plugin_loading.SeglossPluginWarning)  # no warning: it said so
        registered(DeliberateOverridePlugin(), "patcher")
        assert segloss_core.registry().loss("dice").summary == "a patched dice"
        assert segloss_core.describe("dice").summary == "a patched dice"


class FutureLossPlugin:
    @hookimpl
    def segloss_register_losses(self, register):
        from segloss_core.losses.region import DICE

        register(LossSpec(**{**DICE.__dict__, "name": "future_dice", "api_version": 99}))


def test_loss_for_a_newer_api_is_refused(registered):
    with pytest.warns(plugin_loading.SeglossPluginWarning, match="loss 'future_dice' needs segloss plugin API 99"):
        registered(FutureLossPlugin(), "future-loss")
        assert "future_dice" not in segloss_core.list_losses()


def test_two_plugins_claiming_one_backend_name_are_reported(registered):
    registered(BackendsPlugin(EchoBackend()), "echo-a")
    with pytest.warns(plugin_loading.SeglossPluginWarning, match="backend 'echo' is already registered by 'echo-a'"):
        registered(BackendsPlugin(EchoBackend()), "echo-b")
        list_backends()


class FutureBackend(EchoBackend):
    name = "future"
    api_version = 99


def test_backend_for_a_newer_api_is_refused(registered):
    with pytest.warns(plugin_loading.SeglossPluginWarning, match="needs segloss plugin API 99"):
        registered(BackendsPlugin(FutureBackend()), "future")
        states = {b.name: b.state for b in list_backends()}
    assert states["future"] == "broken"
    with pytest.raises(BackendUnavailableError, match="broken"):
        get_loss("dice", backend="future")


class UnavailableBackend(EchoBackend):
    name = "nogpu"

    def availability(self):
        return "no CUDA device"


def test_unavailable_backend_says_why(registered):
    registered(BackendsPlugin(UnavailableBackend()), "nogpu")
    with pytest.raises(BackendUnavailableError, match="'nogpu' is not available here: no CUDA device"):
        get_loss("dice", backend="nogpu")


class NoVoxelwiseBackend(EchoBackend):
    name = "statsonly"


def test_unsupported_loss_names_backends_that_have_it(registered):
    class Plugin:
        @hookimpl
        def segloss_register_backends(self, register):
            register(NoVoxelwiseBackend())

        @hookimpl
        def segloss_register_losses(self, register):
            register(LossSpec("needs_voxels", "test", (), "x", reference=lambda *a, **k: (0.0, 0.0)))

    registered(Plugin(), "statsonly")
    with pytest.raises(UnsupportedLossError, match=r"'statsonly' does not implement loss 'needs_voxels'.*numpy"):
        get_loss("needs_voxels", backend="statsonly")


def _fake_entry_points(monkeypatch, entries):
    monkeypatch.setattr(plugin_loading, "_entry_points", lambda: entries)


def test_broken_entry_point_is_reported_and_others_load(monkeypatch):
    real = {ep.name: ep for ep in metadata.entry_points(group="segloss")}
    broken = metadata.EntryPoint("brokenbackend", "segloss_missing_module_xyz", "segloss")
    _fake_entry_points(monkeypatch, [broken, real["numpy"]])
    reg = Registry()
    with pytest.warns(plugin_loading.SeglossPluginWarning, match="'brokenbackend' \\(import\\): ModuleNotFoundError"):
        infos = {b.name: b for b in reg.backend_infos()}
    assert infos["brokenbackend"].state == "broken"
    assert infos["numpy"].state == "available"
    with pytest.raises(BackendUnavailableError, match="'brokenbackend' is broken") as excinfo:
        reg.backend("brokenbackend")
    assert isinstance(excinfo.value.__cause__, ModuleNotFoundError)


def test_misspelt_hook_fails_only_its_plugin(monkeypatch, tmp_path):
    module = tmp_path / "segloss_misspelt_plugin.py"
    module.write_text(
        "from segloss_core import hookimpl\n@hookimpl\ndef segloss_register_backend(register):\n    pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    real = {ep.name: ep for ep in metadata.entry_points(group="segloss")}
    _fake_entry_points(
        monkeypatch, [metadata.EntryPoint("misspelt", "segloss_misspelt_plugin", "segloss"), real["numpy"]]
    )
    reg = Registry()
    with pytest.warns(plugin_loading.SeglossPluginWarning, match="'misspelt' \\(validate\\)"):
        names = reg.backend_names()
    assert "numpy" in names


def test_disable_autoload_keeps_only_segloss_own_entry_points(monkeypatch):
    real = {ep.name: ep for ep in metadata.entry_points(group="segloss")}
    third_party = metadata.EntryPoint("thirdparty", "segloss_missing_module_xyz", "segloss")
    _fake_entry_points(monkeypatch, [third_party, real["numpy"]])
    monkeypatch.setenv("SEGLOSS_DISABLE_PLUGIN_AUTOLOAD", "1")
    reg = Registry()
    assert reg.backend_names() == ["numpy"]


def test_load_plugins_selects_by_name(monkeypatch):
    monkeypatch.setenv("SEGLOSS_LOAD_PLUGINS", "numpy")
    reg = Registry()
    assert reg.backend_names() == ["numpy"]
    loss = reg.build(reg.loss("dice").plan(reg.loss("dice").resolve(), reg), "numpy")
    x = np.zeros((1, 2, 3, 3))
    assert np.isfinite(loss(x, np.zeros((1, 3, 3), dtype=np.int64)))


class DistanceKernels:
    """Stand-in kernels: maps of a constant, so a test sees which implementation ran."""

    def __init__(self, value: float):
        self.value = value

    def signed_distance_map(self, labels, num_classes, spacing=None, **options):
        return np.full((labels.shape[0], num_classes, *labels.shape[1:]), self.value)

    distance_map = signed_distance_map

    def mask_distance_map(self, masks, spacing=None, **options):
        return np.full(masks.shape, self.value)

    def unavailable(self):
        return None


class DistanceBackend(Backend):
    """Claims NumPy arrays for its distance maps (a backend with kernels for the library it runs on)."""

    name = "aaa-distance"  # first by name: asked before the built-in backends

    def distance_maps_for(self, array):
        return DistanceKernels(7.0) if is_numpy(get_namespace(array)) else None


def test_distance_maps_dispatch_through_a_registered_backend():
    from segloss_core import distance_map, mask_distance_map, signed_distance_map

    labels = np.zeros((1, 4, 5), dtype=np.int64)
    labels[0, 1:3, 1:4] = 1
    reference = signed_distance_map(labels, 2)
    assert reference.dtype == np.float64 and reference.max() > 0  # scipy: no backend claims NumPy arrays
    pm = plugin_manager()
    pm.register(BackendsPlugin(DistanceBackend()), name="distance-plugin")
    try:
        assert np.all(signed_distance_map(labels, 2) == 7.0)
        assert np.all(distance_map(labels, 2) == 7.0)
        assert np.all(mask_distance_map(labels[:, None] == 1) == 7.0)
        np.testing.assert_array_equal(signed_distance_map(labels, 2, reference=True), reference)  # asked for scipy
        loss = get_loss("boundary", backend="numpy")
        assert float(loss(np.zeros((1, 2, 4, 5)), labels)) == pytest.approx(0.5 * 7.0)  # its field: the plugin's
    finally:
        pm.unregister(name="distance-plugin")
    np.testing.assert_array_equal(signed_distance_map(labels, 2), reference)  # the memo follows the registry


class CrashingDistanceBackend(Backend):
    name = "aaa-crashing"

    def distance_maps_for(self, array):
        raise RuntimeError("probe failed")


def test_a_crashing_distance_probe_is_a_warning_and_the_reference_runs(registered):
    from segloss_core import signed_distance_map

    registered(BackendsPlugin(CrashingDistanceBackend()), "crashing-distance")
    labels = np.array([[0, 1, 1, 0]])
    with pytest.warns(segloss_core.SeglossPluginWarning, match=r"distance_maps_for raised RuntimeError: probe failed"):
        phi = signed_distance_map(labels, 2)
    np.testing.assert_array_equal(phi, signed_distance_map(labels, 2, reference=True))


def test_the_core_imports_no_plugin_and_sniffs_no_module_names():
    """Backends own their arrays (Backend.distance_maps_for, segloss_core.arrays): no plugin names in the core."""
    root = Path(segloss_core.__file__).parent
    offenders = []
    for path in sorted(root.rglob("*.py")):
        text = path.read_text()
        for needle in ("import segloss_torch", "from segloss_torch", "import segloss_cupy", "from segloss_cupy"):
            if needle in text:
                offenders.append(f"{path.relative_to(root)}: {needle}")
        if "__module__" in text and path.name != "arrays.py":
            offenders.append(f"{path.relative_to(root)}: __module__")
    assert not offenders, offenders


def test_trace_plugins_traces_every_hook_call():
    """SEGLOSS_TRACE_PLUGINS=1: the hooks are called through pluggy's hook caller, so its tracing sees them."""
    code = "from segloss_core import list_losses; list_losses()"
    env = {**os.environ, "SEGLOSS_TRACE_PLUGINS": "1"}
    err = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stderr
    plugins = {ep.name for ep in metadata.entry_points(group="segloss")}
    calls = err.count("segloss_register_backends [hook]")
    assert calls >= len(plugins & {"numpy", "torch", "cupy"}) and "finish segloss_register_backends --> []" in err
    assert "segloss_register_losses [hook]" in err and "register: <function" in err
    quiet = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stderr
    assert "[hook]" not in quiet


def test_public_plugin_surface_is_what_the_examples_use():
    """Third-party plugins (the examples) import no private segloss name; the helpers they need are public."""
    from segloss_core.losses import common, formula

    assert {"ACTIVATION", "IGNORE_INDEX", "INCLUDE_BACKGROUND", "CLASSES"} <= set(common.__all__)
    assert {"safe_ratio", "full", "included_classes", "select_columns"} <= set(formula.__all__)
    examples = Path(segloss_core.__file__).parent.parent / "plugins" / "examples"
    private = []
    for path in sorted(examples.rglob("*.py")):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            words = line.split()
            if words[:1] in (["from"], ["import"]) and "segloss_core" in line:
                names = line.replace(",", " ").replace("(", " ").split()
                if any(part.startswith("_") for name in names for part in name.split(".") if name != "__future__"):
                    private.append(f"{path.name}:{number}: {line.strip()}")
    assert not private, private


def test_loading_every_plugin_imports_no_framework():
    """segloss_core.hookspecs: "registering must be cheap and must not import heavy frameworks" (and
    segloss_torch.plugin: torch is imported only when the backend is used). Every installed plugin is
    loaded in a fresh interpreter: torch, JAX and CuPy stay unimported until a backend is used."""
    code = (
        "import sys\n"
        "from segloss_core.registry import registry\n"
        "r = registry(); r.loss_names(); r.backend_names()\n"
        "print(sorted(m for m in ('torch', 'jax', 'cupy') if m in sys.modules))\n"
        "from segloss_torch import DeepSupervisionLoss, SeglossLoss, signed_distance_map\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["[]", "True"]
