"""BN statistics re-estimated on a finished meta-train run, to measure `meta.bn_recalibrate` paired.

Usage: ``python benchmarks/bn_recalibrate.py FINISHED_META_RUN --batches N --out NEW_RUN_DIR
[--data-root DIR] [--overwrite]``, then ``mtl compare NEW_RUN_DIR FINISHED_META_RUN`` (or
``mtl meta-test NEW_RUN_DIR``).

NEW_RUN_DIR is what ``mtl meta-train`` with ``--set meta.bn_recalibrate=N`` would have written: the
same meta-trained Phi and theta (the pass comes after meta-training and changes nothing before), with
the kept and last models' BN running statistics re-estimated by the same code
(`metatransfer.train.meta.recalibrate_run`). No meta-training is run again.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from metatransfer.errors import UserError
from metatransfer.train.meta import recalibrate_run


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a finished meta-train run directory (with meta.bn: batch)")
    parser.add_argument("--batches", type=int, required=True, help="batches of train-split images (>= 1)")
    parser.add_argument("--out", type=Path, required=True, help="the new run directory")
    parser.add_argument("--data-root", help="dataset folder, if not the one in the run's config")
    parser.add_argument("--overwrite", action="store_true", help="replace a finished run in --out")
    args = parser.parse_args()
    try:
        path = recalibrate_run(
            args.run, args.out, args.batches, data_root=args.data_root, overwrite=args.overwrite
        )
    except UserError as exc:
        parser.exit(2, f"error: {exc}\n")
    print(f"model: {path}")
    print(f"compare: mtl compare {args.out} {args.run}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
