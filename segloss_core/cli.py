"""The ``segloss`` command line.

segloss list                 losses, with summaries
segloss describe NAME        parameters, presets, formula, references, backends
segloss explain NAME [--preset P]   the exact formula with constants, and its edge-case table
segloss backends             backends: available / unavailable (why) / broken (error)
segloss demo                 every loss on every available backend, synthetic 3D volume
segloss build [BACKEND...]   compile the backends' kernels now; exit 1 if a build failed
segloss check BACKEND        the conformance suite against the float64 reference (--option impl=native)
segloss distmap INPUT... --out DIR --num-classes K   precompute signed distance maps of label volumes
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
from collections.abc import Sequence

from . import __version__
from .describe import describe
from .distance_maps import CONVENTIONS
from .lookup import list_backends, problems
from .registry import registry


def _cmd_list(args: argparse.Namespace) -> int:
    reg = registry()
    names = reg.loss_names()
    width = max(map(len, names))
    for name in names:
        spec = reg.loss(name)
        presets = f" [presets: {', '.join(p.name for p in spec.presets)}]" if spec.presets and args.presets else ""
        print(f"{name:<{width}}  {spec.summary}{presets}")
    return 0


def _cmd_describe(args: argparse.Namespace) -> int:
    print(describe(args.name))
    return 0


def _cmd_backends(args: argparse.Namespace) -> int:
    rows = list_backends()
    width = max((len(r.name) for r in rows), default=7)
    for row in rows:
        print(f"{row.name:<{width}}  {row.state:<11}  {row.description or row.reason or ''}")
        if row.state != "available" and row.reason:
            print(f"{'':<{width}}  {'':<11}  reason: {row.reason}")
        for key, value in row.status.items():
            print(f"{'':<{width}}  {'':<11}  {key}: {value}")
    trouble = [p for p in problems() if p.stage != "import"]
    if trouble:
        print("\nplugin problems:")
        for problem in trouble:
            print(f"  {problem}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(shape=(args.size, args.size, args.size), repeat=args.repeat)
    return 0


def _parse_params(pairs: Sequence[str] | None) -> dict[str, object]:
    import ast

    params: dict[str, object] = {}
    for pair in pairs or ():
        key, sep, raw = pair.partition("=")
        if not sep:
            raise ValueError(f"--param expects NAME=VALUE, got {pair!r}")
        try:
            params[key] = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            params[key] = raw  # a bare word: a choice such as softmax
    return params


def _cmd_explain(args: argparse.Namespace) -> int:
    from .explain import explain

    print(explain(args.name, args.preset, **_parse_params(args.param)))
    return 0


def _cmd_build(args: argparse.Namespace) -> int:
    reg = registry()
    built = failed = False
    for info in list_backends():
        if not info.available or (args.backend and info.name not in args.backend):
            continue
        report = reg.backend(info.name).prebuild()
        if report is not None:
            built = True
            failed = failed or "NOT" in report.split()
            print(f"{info.name}: {report}")
    if not built:
        print("nothing to build for the available backends")
    return 1 if failed else 0


def _cmd_check(args: argparse.Namespace) -> int:
    from .conformance import check_backend

    options = _parse_params(args.option)
    report = check_backend(
        args.backend, losses=args.loss or None, dtypes=args.dtype or None, quick=args.quick, options=options
    )
    print(report)
    return 0 if report.ok else 1


def _cmd_distmap(args: argparse.Namespace) -> int:
    from .datasets.distmap import precompute_distance_maps

    spacing = None if args.spacing is None else args.spacing[0] if len(args.spacing) == 1 else tuple(args.spacing)
    try:
        report = precompute_distance_maps(
            args.inputs,
            args.out,
            args.num_classes,
            spacing=spacing,
            convention=args.convention,
            workers=args.workers,
            overwrite=args.overwrite,
            progress=not args.quiet,
            dtype=args.dtype,
            ignore_index=args.ignore_index,
            engine=args.engine,
        )
    except BrokenPipeError:  # the reader of the progress output went away: main() ends quietly
        raise
    except OSError as exc:  # e.g. the output directory cannot be created
        print(f"segloss: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nsegloss distmap: interrupted; finished maps are kept, run the same command to resume", file=sys.stderr)
        return 130
    print(report.summary())
    return 0 if report.ok else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="segloss", description="Segmentation losses, specified once.")
    parser.add_argument("--version", action="version", version=f"segloss {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("list", help="registered losses")
    p.add_argument("--presets", action="store_true", help="show preset names")
    p.set_defaults(func=_cmd_list)

    p = sub.add_parser("describe", help="everything about one loss")
    p.add_argument("name")
    p.set_defaults(func=_cmd_describe)

    p = sub.add_parser(
        "explain",
        help="the exact formula of a configuration and its edge-case table",
        description=textwrap.fill(
            "Print what one loss configuration computes: every parameter after defaults, preset and "
            "overrides are resolved, the formula written out with those values, and the value and gradient on "
            "the edge cases that decide small-structure training (empty target, false positives only, a "
            "one-voxel lesion predicted at p = 0.01, 0.5 and 0.99, every voxel ignored).",
            80,
        ),
        epilog="examples:\n"
        "  segloss explain dice --preset nnunet\n"
        "  segloss explain dice --preset monai --param include_background=False --param smooth_nr=1\n"
        "  segloss explain tversky --param alpha=0.3 --param beta=0.7\n"
        + textwrap.fill(
            "NAME=VALUE is read as a Python literal (1e-5, False, (0.2, 0.8)); a bare word is a string "
            "(activation=sigmoid). `segloss describe NAME` lists the parameters and presets.",
            80,
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("name", help="a registered loss (`segloss list`)")
    p.add_argument("--preset", help="one of the loss's presets (`segloss describe NAME` lists them)")
    p.add_argument(
        "--param", action="append", metavar="NAME=VALUE", help="override one parameter, after the preset (repeatable)"
    )
    p.set_defaults(func=_cmd_explain)

    p = sub.add_parser(
        "distmap",
        help="precompute signed distance maps of label volumes (.npy, .npz, .nii, .nii.gz)",
        description="Write OUT/<stem>.npy, shape (C, *spatial), for every input label volume; resumable "
        "(existing outputs are skipped), atomic, parallel over files. Exit status 1 if any file failed.",
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="label files, or directories (their label files)")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (created if missing)")
    p.add_argument("--num-classes", type=int, required=True, metavar="K", help="number of classes C")
    p.add_argument(
        "--spacing",
        type=float,
        nargs="+",
        metavar="S",
        help="voxel size: one value for every axis, or one per axis (default: NIfTI header, else 1)",
    )
    p.add_argument("--convention", choices=CONVENTIONS, default="boundary_loss", help="sign convention")
    p.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="worker processes (default: 1 with the segloss engine, which uses every CPU thread itself; CPU count "
        "with scipy; 1: in-process)",
    )
    p.add_argument("--overwrite", action="store_true", help="recompute maps whose output already exists")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument(
        "--engine",
        choices=("auto", "segloss", "scipy"),
        default="auto",
        help="segloss kernels (float32, fast) or scipy (float64 reference); auto: segloss when built",
    )
    p.add_argument("--ignore-index", type=int, metavar="I", help="label value that belongs to no class")
    p.add_argument(
        "--dtype", choices=("float32", "float64", "float16"), default="float32", help="stored dtype (default float32)"
    )
    p.set_defaults(func=_cmd_distmap)

    p = sub.add_parser("backends", help="registered backends and their state")
    p.set_defaults(func=_cmd_backends)

    p = sub.add_parser("demo", help="every loss on every available backend, on a synthetic 3D volume")
    p.add_argument("--size", type=int, default=40, help="edge of the cubic volume (default 40)")
    p.add_argument("--repeat", type=int, default=3, help="timed repetitions per call (median shown)")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser(
        "build",
        help="compile the backends' kernels now (they are otherwise built on first use)",
        description="Compile the fused kernels of every available backend (or of the named ones) now, instead "
        "of on the first loss call, and report where they were built and how long it took (the torch CPU "
        "kernels: about a minute on 2 cores; with CUDA, longer). Exit status 1 when a build fails; the "
        "reason is printed, and the losses then run on the native implementation.",
        epilog="environment: SEGLOSS_BUILD_DIR (cache directory; default $TORCH_EXTENSIONS_DIR or "
        "~/.cache/segloss), SEGLOSS_CUDA_ARCH_LIST (CUDA architectures), SEGLOSS_VERBOSE_BUILD=1 (compiler "
        "output), SEGLOSS_NO_BUILD=1 (never compile: native implementation only). `segloss backends` shows "
        "the state without building.",
    )
    p.add_argument("backend", nargs="*", help="only these backends (default: every available one)")
    p.set_defaults(func=_cmd_build)

    p = sub.add_parser("check", help="run the conformance suite against a backend")
    p.add_argument("backend")
    p.add_argument("--loss", action="append", help="only this loss (repeatable)")
    p.add_argument("--dtype", action="append", help="only this dtype (repeatable)")
    p.add_argument("--quick", action="store_true", help="fewer cases")
    p.add_argument(
        "--option", action="append", metavar="NAME=VALUE", help="backend option for every build, e.g. impl=native"
    )
    p.set_defaults(func=_cmd_check)
    return parser


EXIT_BROKEN_PIPE = 128 + 13  # what a shell reports for a command ended by SIGPIPE


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand; its exit status.

    A closed stdout (``segloss explain dice | head -1``) ends any subcommand quietly with status
    141, as a command killed by SIGPIPE: Python ignores SIGPIPE, so the write raises
    ``BrokenPipeError``; stdout is flushed here, while that can still be caught, and then pointed
    at ``os.devnull`` so the interpreter's final flush does not fail again (the recipe of the
    Python documentation, "Note on SIGPIPE").
    """
    try:
        try:
            return _run(argv)
        finally:
            sys.stdout.flush()
    except BrokenPipeError:
        _discard_stdout()
        return EXIT_BROKEN_PIPE


def _run(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except (ValueError, TypeError, RuntimeError) as exc:
        print(f"segloss: error: {exc}", file=sys.stderr)
        return 2


def _discard_stdout() -> None:
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # replaced by an object without a descriptor (tests)
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
