"""Stage ``prepare``: get MNIST (or your own IDX files) and verify every byte.

python -m vaelab.prepare --params params.yaml --out data/MNIST --custom-dir data/custom
"""

from __future__ import annotations

import argparse
from pathlib import Path

from vaelab import params as params_mod
from vaelab.data import prepare_custom, prepare_mnist
from vaelab.errors import run_stage


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True, help="data dir (torchvision layout)")
    parser.add_argument(
        "--custom-dir", type=Path, required=True, help="IDX files + manifest.json (source: custom)"
    )
    args = parser.parse_args(argv)

    params = params_mod.load(args.params)
    if params.data.source == "custom":
        prepare_custom(args.out, args.custom_dir)
    else:
        prepare_mnist(args.out)


if __name__ == "__main__":
    run_stage(main)
