"""The ``nrfm`` command line: synth, validate, import, run, bench, and the stages pretrain / finetune.

``nrfm pretrain`` and ``nrfm finetune`` run one stage of a run folder; they are what
``torchrun --nproc_per_node N -m nrfm pretrain ...`` launches (see :mod:`nrfm.train.distributed`).

Every subcommand has ``--help``. Errors a user can cause print one line, ``nrfm: error: <where>: <what>``,
and exit with status 2; an interrupted command exits with 130.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Sequence

from nrfm.errors import NrfmError
from nrfm.pipeline.workspace import WORKDIR_ENV, set_workspace

IMPORT_KINDS = ("ucsf-pdgm", "upenn-gbm", "brats2021", "brats2023")


def _nonnegative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {value}")
    return value


def cmd_synth(args: argparse.Namespace) -> int:
    # imported per command, so that `nrfm --help` and argument errors answer without loading torch
    from nrfm.synth.generate import generate_cohort

    result = generate_cohort(Path(args.out), profile=args.profile, seed=args.seed, sites=args.sites,
                             force=args.force, progress=not args.quiet, scenario=args.scenario)
    print(f"manifest: {result.manifest_path}  ({result.seconds:.1f} s)")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    # imported per command, so that `nrfm --help` and argument errors answer without loading torch
    from nrfm.data.validation import validate_manifest

    result = validate_manifest(Path(args.manifest), check_images=not args.no_images, progress=not args.quiet)
    print(result.format())
    return 0 if result.ok else 1


def cmd_import(args: argparse.Namespace) -> int:
    # imported per command, so that `nrfm --help` and argument errors answer without loading torch
    from nrfm.data.importers import import_cohort, merge_manifests

    if args.kind == "merge":
        if not args.inputs:
            raise NrfmError("import merge: give the manifests to merge, e.g. nrfm import merge a.csv b.csv --out m.csv")
        report = merge_manifests([Path(p) for p in args.inputs], Path(args.out), force=args.force)
    else:
        if args.inputs:
            raise NrfmError(f"import {args.kind}: unexpected arguments {args.inputs}; use --root DIR")
        if not args.root:
            raise NrfmError(f"import {args.kind}: --root DIR is required (the downloaded cohort's folder)")
        report = import_cohort(args.kind, Path(args.root), Path(args.out),
                               mgmt_labels=Path(args.mgmt_labels) if args.mgmt_labels else None,
                               force=args.force, progress=not args.quiet)
    print(report.format())
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    # imported per command, so that `nrfm --help` and argument errors answer without loading torch
    from nrfm.config_loading import parse_override
    from nrfm.pipeline.runner import resume_run, start_run, sweep_run

    only = [s for part in (args.only or []) for s in part.split(",") if s]
    overrides = dict(parse_override(item) for item in (args.set or []))
    if args.seed is not None:
        overrides["seed"] = args.seed
    notebook_dir = Path(args.notebooks) if args.notebooks else None
    if args.resume:
        outcome = resume_run(args.resume, out=args.out, progress=not args.quiet)
    elif args.sweep:
        outcome = sweep_run(args.config, args.sweep, out=args.out, manifest=args.manifest, only=only,
                            overrides=overrides, progress=not args.quiet, notebook_dir=notebook_dir)
    else:
        outcome = start_run(args.config, out=args.out, manifest=args.manifest, only=only, overrides=overrides,
                            progress=not args.quiet, notebook_dir=notebook_dir)
    print(f"report: {outcome.report.resolve()}")
    return 0


def _open_stage(args: argparse.Namespace):
    """Open the run on rank 0 first (it may generate the cohort, freeze the splits, fill the cache), then on the rest."""
    # imported per command, so that `nrfm --help` and argument errors answer without loading torch
    import torch

    # imported per command, so that `nrfm --help` and argument errors answer without loading torch
    from nrfm.train import distributed
    from nrfm.config_loading import load_config
    from nrfm.pipeline.context import open_run
    from nrfm.pipeline.workspace import resolve_config_file

    cfg = load_config(resolve_config_file(args.config))
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    d = distributed.init_from_env(use_cuda)
    ctx = None
    if d.is_main:
        ctx = open_run(cfg, args.run_dir, progress=not args.quiet)
        ctx.dataset(progress=not args.quiet)
    distributed.barrier()
    if ctx is None:
        ctx = open_run(cfg, args.run_dir, progress=False)
        ctx.dataset(progress=False)
    return ctx, d


def cmd_pretrain(args: argparse.Namespace) -> int:
    # imported per command, so that `nrfm --help` and argument errors answer without loading torch
    from nrfm.train import distributed
    from nrfm.train.pretrain import run_pretraining_stage

    try:
        ctx, d = _open_stage(args)
        result = run_pretraining_stage(ctx, args.method, progress=not args.quiet)
        if d.is_main:
            print(f"{args.method}: {result.checkpoint} ({d.world_size} process(es))")
    finally:
        distributed.teardown()
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    # imported per command, so that `nrfm --help` and argument errors answer without loading torch
    from nrfm.train import distributed
    from nrfm.train.finetune import run_finetune_stage
    from nrfm.train.pretrain import ensure_pretrained

    try:
        ctx, d = _open_stage(args)
        backbone = ensure_pretrained(ctx, args.method, progress=not args.quiet)  # DDP on every rank if missing
        if d.is_main:  # fine-tuning runs on cached features on rank 0; the others wait (see nrfm.train.distributed)
            result = run_finetune_stage(ctx, args.method, args.objective, args.protocol, backbone=backbone,
                                        progress=not args.quiet)
            print(f"{args.method}/{args.objective}/{args.protocol}: {result.predictions_path} "
                  f"({result.seconds:.1f} s)")
        distributed.barrier()
    finally:
        distributed.teardown()
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    # imported per command, so that `nrfm --help` and argument errors answer without loading torch
    from nrfm.bench.suite import run_benchmarks

    run_benchmarks(parts=args.parts, out_dir=Path(args.out), quick=args.quick)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nrfm",
        description="NeuroRAD-FM reproduction kit: synthetic or imported multi-site glioma MRI, self-supervised 3D "
                    "backbones, group DRO fine-tuning, and the paper's analyses as papermill notebooks.",
        epilog="Start with `make run` (the synthetic default) or `nrfm run --config configs/smoke.yaml` (minutes).")
    parser.add_argument("--workdir", metavar="DIR",
                        help=f"workspace for reports/, data/ and the cache (default: ${WORKDIR_ENV}, else the "
                             "current folder); relative paths are taken from it")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("synth", help="write the synthetic multi-site glioma cohort (NIfTI + manifest + oracle)",
                       description="Write a synthetic multi-site glioma cohort built on the MNI152 template, with "
                                   "known ground truth (oracle.csv) and the canonical manifest.")
    p.add_argument("--out", required=True, help="output folder (refused if it already holds a cohort, see --force)")
    p.add_argument("--profile", default="default", choices=("smoke", "default", "large"),
                   help="cohort size: smoke (tests, seconds), default (about 1030 exams, 160 fixed test patients "
                        "per site, 280 at CUIMC, enriched to 15 positives per marker), large (about 1550)")
    p.add_argument("--scenario", default="site-shift", choices=("site-shift", "no-shift"),
                   help="site-shift: a site-linked cue agrees with EGFR at the large sites and is reversed at the "
                        "smallest, whose EGFR phenotype also differs (what group DRO should fix); no-shift: the "
                        "same cue label-free and one phenotype everywhere (the control)")
    p.add_argument("--seed", type=_nonnegative_int, default=0, help="random seed; same seed gives the same bytes")
    p.add_argument("--sites", default=None,
                   help="site spec overriding the profile's, e.g. 'UCSF:120,UPenn:110,CUIMC:40'")
    p.add_argument("--force", action="store_true", help="replace an existing cohort in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("validate", help="check a manifest and its images; print a per-site summary",
                       description="Check a canonical manifest: columns, ids, labels, survival, splits, and every "
                                   "image (readable NIfTI, 3-D, finite, consistent shapes and affines). Problems are "
                                   "printed as file:row:column: message; exit 1 if any is an error.")
    p.add_argument("manifest", help="path to manifest.csv")
    p.add_argument("--no-images", action="store_true", help="check the table only (fast)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("import", help="turn a public cohort's files into the canonical manifest",
                       description="Import a downloaded public cohort (UCSF-PDGM, UPenn-GBM, BraTS 2021/2023) into "
                                   "the canonical manifest, or merge manifests (patients present in more than one "
                                   "cohort are kept once). See data_manifests/README.md.")
    p.add_argument("kind", choices=IMPORT_KINDS + ("merge",), help="cohort layout, or merge")
    p.add_argument("inputs", nargs="*", help="for merge: the manifests to merge")
    p.add_argument("--root", help="the cohort's top folder as downloaded")
    p.add_argument("--out", required=True, help="manifest to write (refused if it exists, see --force)")
    p.add_argument("--mgmt-labels", help="brats2021: RSNA-MICCAI train_labels.csv with MGMT_value")
    p.add_argument("--force", action="store_true", help="overwrite --out")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("run", help="run the notebooks with papermill into reports/<run_id>/ and render the report",
                       description="Execute the ordered notebooks into a new run folder and render index.html. "
                                   "A run never overwrites another run.")
    p.add_argument("--config", default="configs/default.yaml",
                   help="YAML config: a path, or the name of a shipped config (smoke: minutes; default: the main "
                        "job; paper: real cohorts on a GPU)")
    p.add_argument("--manifest", help="use this canonical manifest instead of the synthetic cohort")
    p.add_argument("--out", default="reports", help="folder that holds run folders (default: reports)")
    p.add_argument("--only", action="append",
                   help="run only these notebooks and what they need, e.g. --only 05_gradcam also runs 00-02 "
                        "(the stage graph: nrfm/pipeline/stages.py)")
    p.add_argument("--sweep", nargs="+", metavar="NAME=V1,V2",
                   help="parameter sweep, e.g. --sweep backbone=byol,dino seed=0,1,2: one run per combination "
                        "and a summary with mean and spread")
    p.add_argument("--seed", type=_nonnegative_int, help="override the config's seed")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config key, e.g. --set pretraining.epochs=2 (repeatable)")
    p.add_argument("--notebooks", default=None,
                   help="folder of ordered notebooks (00_*.ipynb, 01_*.ipynb, ...); default: the notebooks shipped "
                        "with nrfm")
    p.add_argument("--resume", metavar="RUN_ID", help="continue an interrupted run after its last completed notebook")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_run)

    # imported per command, so that `nrfm --help` and argument errors answer without loading torch
    from nrfm.config import OBJECTIVES, PROTOCOLS, SSL_METHODS

    for name, text in (("pretrain", "pretrain one SSL backbone in a run folder (what torchrun launches)"),
                       ("finetune", "fine-tune one backbone with one objective and protocol in a run folder")):
        p = sub.add_parser(name, help=text,
                           description=f"{text[0].upper()}{text[1:]}. Under `torchrun --nproc_per_node N -m nrfm "
                                       f"{name} ...` it runs on N processes (DistributedDataParallel for pretraining;"
                                       " fine-tuning on rank 0 while the others wait).")
        p.add_argument("--config", default="configs/default.yaml", help="YAML config")
        p.add_argument("--run-dir", required=True, help="run folder (created if missing; shared by all processes)")
        p.add_argument("--method", required=True, choices=SSL_METHODS, help="SSL method / backbone")
        if name == "finetune":
            p.add_argument("--objective", default="erm", choices=OBJECTIVES, help="training objective")
            p.add_argument("--protocol", default="pooled", choices=PROTOCOLS, help="evaluation protocol")
        p.add_argument("--quiet", action="store_true", help="no progress bars")
        p.set_defaults(func=cmd_pretrain if name == "pretrain" else cmd_finetune)

    p = sub.add_parser("bench", help="measure throughput, FLOP/s, loader speed and pipeline wall time",
                       description="Benchmarks, in one process on the same data: the fast training path against a "
                                   "plain fp32 baseline, achieved FLOP/s against the matmul rate, data loading "
                                   "against training, and pipeline wall time / peak memory.")
    p.add_argument("--parts", nargs="+", default=["throughput", "flops", "loader"],
                   choices=("throughput", "flops", "loader", "scaling", "smoke", "default", "synth", "soak"),
                   help="what to measure (default: throughput flops loader; smoke/default run whole pipelines)")
    p.add_argument("--out", default="benchmarks/results", help="folder for <date>.json")
    p.add_argument("--quick", action="store_true", help="fewer repetitions (for tests)")
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        if args.workdir:
            os.chdir(set_workspace(args.workdir))
        return args.func(args)
    except NrfmError as err:
        print(f"nrfm: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("nrfm: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
