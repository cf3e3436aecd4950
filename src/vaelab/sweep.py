"""Start a sweep's MLflow parent run (``make sweep`` does, before queueing the experiments):
every run whose ``mlflow.sweep`` is the label becomes its child, and ``vaelab.compare`` logs the
sweep's report into it.

    python -m vaelab.sweep --params params.yaml --label latent_dims-20261129 \
        --swept model.latent_dims=2,5,10,20
"""

from __future__ import annotations

import argparse
from pathlib import Path

from vaelab import params as params_mod
from vaelab.errors import VaelabError, run_stage
from vaelab.tracking.sweeps import start_sweep


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, required=True, help="for mlflow.experiment")
    parser.add_argument("--label", required=True, help="the sweep's mlflow.sweep label")
    parser.add_argument("--swept", nargs="+", required=True, help="KEY=VALUES, as dvc's -S")
    args = parser.parse_args(argv)
    if not all("=" in item for item in args.swept):
        raise VaelabError(f"--swept takes KEY=VALUES items, got {args.swept}")
    swept = dict(item.split("=", 1) for item in args.swept)
    experiment = params_mod.load(args.params).mlflow.experiment
    run_id = start_sweep(experiment, args.label, swept)
    print(f"sweep: MLflow parent run {run_id} for the runs of sweep '{args.label}'")


if __name__ == "__main__":
    run_stage(main)
