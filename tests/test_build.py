"""The fused kernels' build: a cache shared by checkouts and venvs, atomic publication, locks that
die with their holder, an announced first build, construction-time loading (torch.compile on the
very first call), and a CPU part that needs no CUDA toolkit.

The lock, kill and publication tests compile a one-function source (a second or two) through the
same ``build_library`` the real parts use; the venv test compiles the real CPU part once, with no
nvcc anywhere, and shows that a second venv and checkout load it without compiling.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from segloss_torch import build  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PROBE = 'extern "C" int segloss_probe() { return 42; }\n'


def _probe_recipe(root: Path) -> build.BuildRecipe:
    root.mkdir(parents=True, exist_ok=True)
    (root / "probe.cpp").write_text(PROBE)
    return build.BuildRecipe(name="segloss_probe", root=root, sources=("probe.cpp",), cflags=("-O1",))


def _slow_compiler(tmp_path: Path) -> tuple[Path, Path]:
    """A C++ compiler that is the real one, but stalls in a compile step while `marker` exists."""
    marker = tmp_path / "stall"
    wrapper = tmp_path / "slow-c++"
    wrapper.write_text(
        textwrap.dedent(
            f"""\
            #!/bin/sh
            case " $* " in
              *" -c "*) while [ -e "{marker}" ]; do sleep 0.2; done ;;
            esac
            exec c++ "$@"
            """
        )
    )
    wrapper.chmod(0o755)
    return wrapper, marker


BUILD_PROBE = r"""
import sys
from pathlib import Path
from segloss_torch import build

recipe = build.BuildRecipe(name="segloss_probe", root=Path(sys.argv[1]), sources=("probe.cpp",), cflags=("-O1",))
announced = []
result = build.build_library(recipe, root=Path(sys.argv[2]), announce=lambda r, d: announced.append(d))
import ctypes
assert ctypes.CDLL(str(result.library)).segloss_probe() == 42
print("RESULT", result.built, len(announced), result.library)
"""


def _run_probe(src: Path, cache: Path, env: dict[str, str], **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", BUILD_PROBE, str(src), str(cache)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


def _result(process: subprocess.Popen) -> tuple[bool, int, Path]:
    out, err = process.communicate(timeout=600)  # a hang guard, not a timing assertion
    assert process.returncode == 0, out + err
    line = next(line for line in out.splitlines() if line.startswith("RESULT"))
    _, built, announced, library = line.split(" ", 3)
    return built == "True", int(announced), Path(library)


def test_key_covers_the_binary_and_no_path(tmp_path, monkeypatch):
    """Same sources in two checkouts: one key. Any source byte, flag or compiler change: a new key."""
    a = build.recipe(build.CPU_PART)
    key = a.key()
    copy = tmp_path / "other-checkout" / "segloss_csrc"
    shutil.copytree(a.root, copy, ignore=shutil.ignore_patterns("__pycache__", "*.py"))
    b = build.recipe(build.CPU_PART, root=copy)
    assert b.key() == key and str(copy) not in str(b.ingredients())
    for path in (sys.prefix, Path(torch.__file__).parent):  # nor is the venv's or torch's path
        assert str(path) not in str(a.ingredients())
    (copy / "kernels" / "common.cuh").write_text((copy / "kernels" / "common.cuh").read_text() + "\n// edit\n")
    assert build.recipe(build.CPU_PART, root=copy).key() != key
    assert build.BuildRecipe(**{**a.__dict__, "cflags": (*a.cflags, "-DX")}).key() != key
    fake = tmp_path / "other-c++"
    fake.write_text("#!/bin/sh\necho 'other-c++ 99.1'\n")
    fake.chmod(0o755)
    monkeypatch.setenv("CXX", str(fake))
    assert build.recipe(build.CPU_PART).key() != key
    for name in ("torch", "torch_cuda", "cxx", "cflags", "cpu", "python", "sources"):
        assert a.ingredients()[name], name


def test_publication_is_one_atomic_rename_from_a_private_directory(tmp_path, monkeypatch):
    recipe = _probe_recipe(tmp_path / "src")
    cache = tmp_path / "cache"
    library = build.library_path(recipe, cache)
    renames: list[tuple[Path, Path, bool]] = []
    real_replace = os.replace

    def spy(src, dst):
        renames.append((Path(src), Path(dst), Path(dst).exists()))
        real_replace(src, dst)

    monkeypatch.setattr(build.os, "replace", spy)
    result = build.build_library(recipe, root=cache)
    assert result.built and result.library == library and library.is_file()
    [(src, dst, existed)] = renames
    assert dst == library and not existed
    assert src.parent.parent == library.parent and src.parent.name.startswith(
        f"tmp-{os.uname().nodename}-{os.getpid()}-"
    )
    assert not list(library.parent.glob("tmp-*"))  # the private directory is gone
    again = build.build_library(recipe, root=cache)
    assert not again.built and again.library == library and len(renames) == 1


def test_concurrent_builders_compile_once(tmp_path):
    """Two processes start together: one compiles under the lock, the other waits and loads it."""
    recipe = _probe_recipe(tmp_path / "src")
    wrapper, marker = _slow_compiler(tmp_path)
    marker.touch()
    env = {**os.environ, "CXX": str(wrapper)}
    cache = tmp_path / "cache"
    first = _run_probe(recipe.root, cache, env)
    directory = _wait_for_a_build(cache, first)
    second = _run_probe(recipe.root, cache, env)
    time.sleep(1.0)
    marker.unlink()
    results = [_result(first), _result(second)]
    assert sorted(built for built, _, _ in results) == [False, True]
    assert sum(announced for _, announced, _ in results) == 1
    assert {library for _, _, library in results} == {next(directory.glob("*.so"))}


def _wait_for_a_build(cache: Path, process: subprocess.Popen) -> Path:
    for _ in range(3000):
        found = list(cache.glob("*/tmp-*"))
        if found:
            return found[0].parent
        assert process.poll() is None, process.communicate()
        time.sleep(0.1)
    raise AssertionError("the build did not start")


def test_a_killed_build_leaves_no_lock_and_no_library(tmp_path):
    """SIGKILL a builder mid-compile: the lock is free at once, nothing was published, and the next
    process builds normally (a stale lock would make it wait forever)."""
    recipe = _probe_recipe(tmp_path / "src")
    wrapper, marker = _slow_compiler(tmp_path)
    marker.touch()
    env = {**os.environ, "CXX": str(wrapper)}
    cache = tmp_path / "cache"
    victim = _run_probe(recipe.root, cache, env, start_new_session=True)
    directory = _wait_for_a_build(cache, victim)
    os.killpg(victim.pid, signal.SIGKILL)  # the builder and its compiler
    victim.communicate(timeout=60)
    library = build.library_path(recipe, cache)
    assert not library.exists()
    with open(directory / "lock", "a") as handle:  # the kernel released the dead holder's flock
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(handle, fcntl.LOCK_UN)
    marker.unlink()
    built, announced, published = _result(_run_probe(recipe.root, cache, env))
    assert built and announced == 1 and published == library and library.is_file()
    assert not list(directory.glob("tmp-*"))  # the killed builder's leftovers were removed


def test_cuda_paths():
    """nvcc where it exists, NVRTC without it (or on request); reasons where neither applies."""
    assert build.cuda_plan("auto", torch_cuda=False, gpu=False, nvcc=True) == ([], "torch was built without CUDA")
    assert build.cuda_plan("auto", torch_cuda=True, gpu=False, nvcc=True) == ([], "no CUDA device is visible")
    assert build.cuda_plan("auto", torch_cuda=True, gpu=True, nvcc=True) == (["nvcc", "nvrtc"], None)
    assert build.cuda_plan("auto", torch_cuda=True, gpu=True, nvcc=False) == (["nvrtc"], None)
    assert build.cuda_plan("nvrtc", torch_cuda=True, gpu=True, nvcc=True) == (["nvrtc"], None)
    paths, reason = build.cuda_plan("nvcc", torch_cuda=True, gpu=True, nvcc=False)
    assert paths == [] and "nvcc is not installed" in reason


VENV_CHILD = r"""
import shutil, sys
from pathlib import Path
import segloss_csrc
if len(sys.argv) > 1:  # another checkout of the same code
    segloss_csrc.source_dir = lambda: Path(sys.argv[1])
assert shutil.which("nvcc") is None
from segloss_torch import build
state = build.load()
assert state.loaded, state.error
assert state.with_cuda is False
print("PREFIX", sys.prefix)
print("LIBRARY", state.library)
"""


def _light_venv(path: Path) -> Path:
    """A venv of its own (its own prefix and interpreter path) that sees this environment's packages."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True, timeout=300)
    python = path / "bin" / "python"
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    ours = next(p for p in sys.path if p.endswith("site-packages") and Path(p).is_dir())
    Path(site, "segloss_test_parent.pth").write_text(f"import site; site.addsitedir({ours!r})\n")
    return python


def test_two_venvs_and_checkouts_share_one_cpu_build_without_nvcc(tmp_path):
    """Venv A builds the CPU part with no nvcc on PATH and no CUDA_HOME; venv B (another checkout)
    and venv A again load that build without compiling. The first build announces itself."""
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_HOME", "CUDA_PATH", "TORCH_EXTENSIONS_DIR")}
    env["PATH"] = os.pathsep.join(
        d for d in env.get("PATH", "").split(os.pathsep) if d and not (Path(d) / "nvcc").exists()
    )
    env["SEGLOSS_BUILD_DIR"] = str(tmp_path / "cache")
    checkout = tmp_path / "checkout-b" / "segloss_csrc"
    shutil.copytree(build.segloss_csrc.source_dir(), checkout, ignore=shutil.ignore_patterns("__pycache__"))
    venvs = {"a": _light_venv(tmp_path / "venv-a"), "b": _light_venv(tmp_path / "venv-b")}
    runs = []
    for which, args in (("a", []), ("b", [str(checkout)]), ("a", [])):
        result = subprocess.run(
            [str(venvs[which]), "-c", VENV_CHILD, *args], capture_output=True, text=True, env=env, timeout=1800
        )
        assert result.returncode == 0, result.stdout + result.stderr
        runs.append(result)
    prefixes = [next(line for line in r.stdout.splitlines() if line.startswith("PREFIX")) for r in runs]
    assert prefixes[0] != prefixes[1] and prefixes[0] == prefixes[2]
    libraries = {next(line for line in r.stdout.splitlines() if line.startswith("LIBRARY")) for r in runs}
    assert len(libraries) == 1
    first, second, third = (r.stderr for r in runs)
    # the announcement: what, why, how long, how to prebuild, how to opt out; then the outcome
    assert first.count("segloss: compiling the fused CPU kernels") == 1
    for words in ("no build in the cache yet", "This takes about", "`segloss build`", "SEGLOSS_NO_BUILD=1"):
        assert words in first, first
    assert "fused CPU kernels built in" in first
    assert "compiling" not in second and "compiling" not in third  # cache hits: nothing compiled
    assert len(list((tmp_path / "cache").glob("segloss_cpu_*"))) == 1


FIRST_CALL = r"""
import sys
import torch
from segloss_core import get_loss

name = sys.argv[1]
g = torch.Generator().manual_seed(0)
x = torch.randn(2, 3, 8, 7, generator=g, dtype=torch.float64, requires_grad=True)
y = torch.randint(0, 3, (2, 8, 7), generator=g)
loss = get_loss(name, backend="torch")
compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
value = compiled(x, y)  # the very first loss call of this process
(grad,) = torch.autograd.grad(value, x)
eager = loss(x, y)
(eager_grad,) = torch.autograd.grad(eager, x)
torch.testing.assert_close(value, eager)
torch.testing.assert_close(grad, eager_grad)
print("IMPL", loss.implementation())
"""


@pytest.mark.parametrize("name", ["dice", "dice_ce", "boundary", "hausdorff_dt"])
def test_torch_compile_fullgraph_on_the_first_call_of_a_fresh_process(name):
    """The build is settled when the loss is constructed: dynamo never meets the lock, and every op
    (distance maps for boundary/hausdorff_dt computed on the fly) has a fake kernel."""
    result = subprocess.run([sys.executable, "-c", FIRST_CALL, name], capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stdout + result.stderr[-4000:]
    if build.load().loaded and name in ("dice", "dice_ce"):
        assert "IMPL fused" in result.stdout


def test_construction_settles_the_build_and_forward_never_builds(monkeypatch):
    from segloss_core import get_loss

    get_loss("dice", backend="torch")
    assert build.status().attempted

    def no_build(*args, **kwargs):
        raise AssertionError("forward must not build")

    monkeypatch.setattr(build, "build_library", no_build)
    loss = get_loss("boundary", backend="torch")
    x = torch.randn(1, 2, 6, 6, requires_grad=True)
    loss(x, torch.randint(0, 2, (1, 6, 6))).backward()


def _settled_cuda(monkeypatch, *, nvcc: Path | None, nvcc_build_fails: bool, nvrtc_reason: str | None):
    """_settle_cuda on a pretend GPU machine (torch with CUDA, one device), nothing launched."""
    from segloss_torch import nvrtc_kernels

    registered = []
    monkeypatch.setattr(build.torch.version, "cuda", "13.0")
    monkeypatch.setattr(build.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(build, "find_nvcc", lambda: nvcc)
    monkeypatch.setattr(build, "_cuda_arch_list", lambda: "9.0")
    monkeypatch.delenv("SEGLOSS_CUDA_KERNELS", raising=False)

    def ensure(part, verbose, announce):
        assert part is build.CUDA_PART
        if nvcc_build_fails:
            raise build.BuildError("nvcc fatal: unsupported gpu architecture 'compute_90'")
        return Path("/cache/segloss_cuda.so"), 1.0

    monkeypatch.setattr(build, "_ensure", ensure)
    monkeypatch.setattr(nvrtc_kernels, "unavailable_reason", lambda: nvrtc_reason)
    monkeypatch.setattr(nvrtc_kernels, "register", lambda: registered.append(True))
    state = build.BuildState(attempted=True, loaded=True, library="/cache/segloss_cpu.so")
    build._settle_cuda(state, verbose=False)
    return state, registered


def test_without_nvcc_the_gpu_gets_the_nvrtc_kernels(monkeypatch):
    state, registered = _settled_cuda(monkeypatch, nvcc=None, nvcc_build_fails=False, nvrtc_reason=None)
    assert state.with_cuda and state.cuda_path == "nvrtc" and registered == [True]
    assert state.cuda_error == "nvcc: not installed" and state.loaded  # the CPU part is untouched


def test_a_broken_nvcc_falls_back_to_nvrtc_and_costs_the_cpu_part_nothing(monkeypatch):
    state, registered = _settled_cuda(
        monkeypatch, nvcc=Path("/opt/cuda/bin/nvcc"), nvcc_build_fails=True, nvrtc_reason=None
    )
    assert state.cuda_path == "nvrtc" and registered and "unsupported gpu architecture" in state.cuda_error
    assert state.loaded and state.library == "/cache/segloss_cpu.so"
    state, registered = _settled_cuda(
        monkeypatch, nvcc=Path("/opt/cuda/bin/nvcc"), nvcc_build_fails=False, nvrtc_reason=None
    )
    assert state.cuda_path == "nvcc" and state.cuda_library == "/cache/segloss_cuda.so" and not registered


def test_no_cuda_path_gives_both_reasons(monkeypatch):
    state, registered = _settled_cuda(monkeypatch, nvcc=None, nvcc_build_fails=False, nvrtc_reason="cuda.core missing")
    assert not state.with_cuda and not registered
    assert state.cuda_error == "nvcc: not installed; nvrtc: cuda.core missing" and state.loaded


def test_backends_reports_each_part(capsys):
    from segloss_core.cli import main
    from segloss_torch import fused

    fused.prepare()
    assert main(["backends"]) == 0
    out = capsys.readouterr().out
    cpu = "fused CPU: active" if build.status().loaded else "fused CPU: unavailable"
    assert cpu in out
    assert "fused CUDA: " in out and ("torch was built without CUDA" in out or "fused CUDA: active" in out)
