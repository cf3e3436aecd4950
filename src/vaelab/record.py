"""Stage ``record`` (always runs): make sure MLflow holds one complete run for this result.

    python -m vaelab.record --params params.yaml --run-info models/mlflow_run.json ...

See ``vaelab.tracking.record`` for when it completes the train run, rebuilds one, or does nothing.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from vaelab import history
from vaelab import params as params_mod
from vaelab.errors import run_stage
from vaelab.tracking.record import PipelineOutputs, record


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name in ("params", "run-info", "checksums", "history", "metrics", "figures", "model"):
        parser.add_argument(f"--{name}", type=Path, required=True)
    args = parser.parse_args(argv)

    params = params_mod.load(args.params)
    outputs = PipelineOutputs(
        params_file=args.params,
        run_info=args.run_info,
        checksums=args.checksums,
        history=args.history,
        metrics=args.metrics,
        figures=args.figures,
        model=args.model,
    )
    record(params, outputs, history.read(args.history))


if __name__ == "__main__":
    run_stage(main)
