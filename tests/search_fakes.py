"""A fake of the search's runner (``vaelab.search.Runner``): each experiment is a scripted
per-epoch curve and final value, advanced one epoch each time the search looks at it, its "run"
a JSON file in a folder that several processes share. Lets the tests drive the real ask-and-tell
loop (Optuna, the budget, pruning, settling abandoned trials, confirmations) in seconds.

Run as a module it is a search process of its own (the kill and the two-process tests):

    python -m tests.search_fakes SEARCH_YAML STORAGE FOLDER JOBS [--hang NAME] [--sleep S]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path

import yaml

from tests.conftest import PROJECT

METRIC = "eval/val_iw/nll"


def value_of(overrides: dict[str, str], epochs: int = 4) -> tuple[list[float], float]:
    """The scripted outcome of a trial: its per-epoch curve and its final value, from its
    overrides (train.lr, model.latent_dims, train.seed): best near lr 10**-2.5 and 6 latent
    dimensions, each seed adding 0.1. Known in closed form, so tests can compute what the
    search must report."""
    lr = float(overrides.get("train.lr", "0.003"))
    latent = int(overrides.get("model.latent_dims", "6"))
    seed = int(overrides.get("train.seed", "0"))
    final = abs(math.log10(lr) + 2.5) * 10 + abs(latent - 6) + 0.1 * seed
    return [final + 10 / epoch for epoch in range(1, epochs + 1)], final


class FakeRunner:
    """Experiments as ``outcome(overrides)`` -> (curve, final), kept as JSON in ``folder``.
    Each ``poll`` advances a running experiment by one epoch; at its last epoch it finishes
    (exit 0, or 1 when its name is in ``fail``). With ``hang`` = a name, the process writes
    ``folder/hung`` and sleeps once that experiment has finished (to be killed)."""

    def __init__(
        self,
        folder: Path,
        outcome: Callable[[dict[str, str]], tuple[list[float], float]] = value_of,
        fail: tuple[str, ...] = (),
        hang: str | None = None,
        sleep: float = 0.0,
    ) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.outcome, self.fail, self.hang, self.sleep = outcome, set(fail), hang, sleep
        self.launched: list[str] = []  # names, in order, by this runner
        self.stopped: dict[str, int] = {}  # name -> the epoch it was at when stopped

    def path(self, name: str) -> Path:
        return self.folder / f"{name}.json"

    def get(self, name: str) -> dict:
        return json.loads(self.path(name).read_text())

    def put(self, name: str, record: dict) -> None:
        temporary = self.path(name).with_suffix(f".{os.getpid()}.tmp")
        temporary.write_text(json.dumps(record))
        temporary.replace(self.path(name))

    def launch(self, name: str, overrides: dict[str, str]) -> int:
        assert not self.path(name).exists(), f"experiment {name} launched twice"
        curve, final = self.outcome(overrides)
        record = {"overrides": overrides, "curve": curve, "final": final, "epoch": 0,
                  "code": None, "status": "RUNNING", "tags": {}, "pid": os.getpid()}  # fmt: skip
        self.put(name, record)
        self.launched.append(name)
        return 2**22 + 1  # a process group that does not exist

    def poll(self, name: str) -> int | None:
        time.sleep(self.sleep)
        record = self.get(name)
        if record["code"] is None:
            record["epoch"] += 1
            if record["epoch"] >= len(record["curve"]):
                record["code"] = 1 if name in self.fail else 0
                record["status"] = "FINISHED" if record["code"] == 0 else "FAILED"
            self.put(name, record)
            if record["code"] == 0 and name == self.hang:
                (self.folder / "hung").write_text(name)
                time.sleep(600)
        return record["code"]

    def stop(self, names: list[str]) -> None:
        for name in names:
            record = self.get(name)
            record.update(code=2, status="KILLED")
            self.put(name, record)
            self.stopped[name] = record["epoch"]

    def stop_orphan(self, pgid: int, name: str) -> bool:
        return False

    def run_id(self, name: str, since: float, finished: bool = False) -> str | None:
        if not self.path(name).exists():
            return None
        if finished and self.get(name)["status"] != "FINISHED":
            return None
        return name

    def curve(self, run_id: str, key: str) -> list[tuple[int, float]]:
        record = self.get(run_id)
        return [(e + 1, v) for e, v in enumerate(record["curve"][: record["epoch"]])]

    def metrics(self, run_id: str) -> dict[str, float]:
        record = self.get(run_id)
        return {METRIC: record["final"]} if record["status"] == "FINISHED" else {}

    def adopt(self, run_id: str, trial: int | None, confirms: int | None) -> None:
        record = self.get(run_id)
        record["tags"].update({"trial": trial, "confirms": confirms})
        self.put(run_id, record)

    def end_run(self, run_id: str, tags: dict[str, str]) -> None:
        record = self.get(run_id)
        record["tags"].update(tags)
        record["status"] = "KILLED"
        self.put(run_id, record)

    def progress(self, counts: dict[str, int], best: dict | None) -> None:
        pass

    def tail(self, name: str) -> str:
        return f"fake failure of {name}"


def load_search(text: str, name: str = "fake"):
    """A search file's text, validated against the project's params.yaml and dvc.yaml."""
    from vaelab import search_file

    params_raw = yaml.safe_load((PROJECT / "params.yaml").read_text())
    pipeline = yaml.safe_load((PROJECT / "dvc.yaml").read_text())
    return search_file.parse(yaml.safe_load(text), Path(f"{name}.yaml"), params_raw, pipeline)


def main() -> None:
    from vaelab import search, search_study

    parser = argparse.ArgumentParser()
    parser.add_argument("search_yaml", type=Path)
    parser.add_argument("storage")
    parser.add_argument("folder", type=Path)
    parser.add_argument("jobs", type=int)
    parser.add_argument("--hang")
    parser.add_argument("--sleep", type=float, default=0.0)
    args = parser.parse_args()
    spec = load_search(args.search_yaml.read_text(), args.search_yaml.stem)
    study = search_study.open_study(spec, search_study.open_storage(args.storage, Path("unused")))
    runner = FakeRunner(args.folder, hang=args.hang, sleep=args.sleep)
    searcher = search.Searcher(spec, study, runner, args.jobs, poll=0.0)
    searcher.run()


if __name__ == "__main__":
    main()
