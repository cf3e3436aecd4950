"""The MLflow UI in a real headless Chromium (Python playwright driving Debian's chromium), on
the server and two runs of test_remote_tracking.py (the session fixture ``filled_server``).

Skips with the reason when playwright or a chromium executable is missing; `.ci/run` installs
both, so CI runs it. Screenshots go to the test's tmp_path (paths printed; pytest -s or -rP).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import urllib.parse
from pathlib import Path

import pytest

from vaelab import params as params_mod

UI_TIMEOUT_MS = 60_000  # the first page load compiles the UI's JS bundle: slow on 2 busy cores


def find_chromium() -> str | None:
    """Debian's real binary first (/usr/bin/chromium is a shell wrapper around it)."""
    if os.access("/usr/lib/chromium/chromium", os.X_OK):
        return "/usr/lib/chromium/chromium"
    return shutil.which("chromium") or shutil.which("chromium-browser")


CHROMIUM = find_chromium()
pytestmark = [
    pytest.mark.browser,
    # Under `pytest -n 2 --dist loadgroup` (make test) the tests of the shared tracking server
    # (this file, test_explorer_browser.py, test_remote_tracking.py) run in one worker.
    pytest.mark.xdist_group("tracking_server"),
    pytest.mark.skipif(
        CHROMIUM is None, reason="no chromium executable (apt-get install chromium)"
    ),
]
sync_api = pytest.importorskip(
    "playwright.sync_api", reason="playwright is not installed (pip install -e '.[dev]')"
)


def new_page(browser, width: int = 1600, height: int = 1000):  # -> a playwright Page
    """A page of the `browser` fixture's Chromium (tests/conftest.py) at that viewport, waiting up
    to UI_TIMEOUT_MS for what it is asked; the caller closes it."""
    page = browser.new_page(viewport={"width": width, "height": height})
    page.set_default_timeout(UI_TIMEOUT_MS)
    return page


def compare_url(base: str, run_ids: list[str], experiment_id: str) -> str:
    """MLflow 3's compare view, as its Compare button opens it:
    #/compare-runs?runs=["<id>",...]&experiments=["<id>"] (JSON lists, URL-quoted)."""
    runs = urllib.parse.quote(json.dumps(run_ids, separators=(",", ":")))
    experiments = urllib.parse.quote(json.dumps([experiment_id], separators=(",", ":")))
    return f"{base}/#/compare-runs?runs={runs}&experiments={experiments}"


def latest_metric(run: dict, key: str) -> float:
    return next(m["value"] for m in run["data"]["metrics"] if m["key"] == key)


def _within(inner: dict | None, outer: dict | None) -> bool:
    return bool(inner and outer) and (
        outer["y"] - 1 <= inner["y"]
        and inner["y"] + inner["height"] <= outer["y"] + outer["height"] + 1
    )


def _scroll_metrics(page, names, values, y: int) -> None:  # playwright handles
    """Scroll the compare view's metric values to y and wait until the names follow.

    MLflow 3.17.2 moves the names grid from the values grid's scroll handler with the position
    the values grid held *before* that event, so the names lag one scroll behind (after a single
    scroll to y they stay at the old position; with a mouse wheel the rows end up misaligned by
    the last step). Two scroll events, to a neighbouring pixel and then to y, leave them within a
    pixel."""
    for _ in range(3):
        values.evaluate(
            """async (grid, y) => {
                const frame = () => new Promise(done => requestAnimationFrame(done));
                const frames = async () => { await frame(); await frame(); };
                grid.scrollTop = y > 0 ? y - 1 : 1; await frames();
                grid.scrollTop = y; await frames();
            }""",
            y,
        )
        try:
            page.wait_for_function(
                "([names, values]) => Math.abs(names.scrollTop - values.scrollTop) <= 1",
                arg=[names, values],
                timeout=5_000,
            )
            return
        except sync_api.TimeoutError:
            continue
    raise AssertionError(f"the metric names did not follow the values to {y}px")


def metric_values(page, name: str) -> list[str]:  # a playwright Page
    """The texts of the value cells on the line of metric ``name`` in the compare view, left to
    right, once that line is really in view.

    MLflow draws the metrics as two virtualized grids: the names (overflow hidden) and the values
    (the one that scrolls), which the names grid follows. A row far down is not in the DOM until
    scrolled to, and a rendered row may still be clipped, so scroll from the top, half a grid at a
    time, until the name lies inside the names grid's box."""
    grids = page.locator(".ReactVirtualized__Grid")
    scrolls = grids.evaluate_all("gs => gs.map(g => getComputedStyle(g).overflowY !== 'hidden')")
    assert sorted(scrolls) == [False, True], f"expected a names and a values grid: {scrolls}"
    names = grids.nth(scrolls.index(False)).element_handle()
    values = grids.nth(scrolls.index(True)).element_handle()
    label = page.locator(".ReactVirtualized__Grid").get_by_text(name, exact=True)
    names.scroll_into_view_if_needed()
    _scroll_metrics(page, names, values, 0)
    while not (label.count() == 1 and _within(label.bounding_box(), names.bounding_box())):
        top, end, step = values.evaluate(
            "g => [g.scrollTop, g.scrollHeight - g.clientHeight, Math.floor(g.clientHeight / 2)]"
        )
        assert top < end, f"metric {name!r} not found in the compare view's metrics grid"
        _scroll_metrics(page, names, values, min(top + step, end))
    row = label.bounding_box()
    middle = row["y"] + row["height"] / 2
    cells = values.evaluate(
        """(grid, middle) => Array.from(grid.querySelectorAll('*'))
            .filter(e => e.children.length === 0 && e.innerText.trim())
            .map(e => [e.getBoundingClientRect(), e.innerText.trim()])
            .filter(([box]) => Math.abs(box.y + box.height / 2 - middle) < box.height)
            .sort(([a], [b]) => a.x - b.x)
            .map(([, text]) => text)""",
        middle,
    )
    return cells


def test_runs_and_their_comparison_render_in_chromium(browser, filled_server, tmp_path: Path):
    server, runs = filled_server.server, filled_server.runs
    # Through REST first: what the pages must show is there.
    assert [r["info"]["status"] for r in runs] == ["FINISHED", "FINISHED"]
    names = [r["info"]["run_name"] for r in runs]
    ids = [r["info"]["run_id"] for r in runs]
    for run_id, params_file in zip(ids, filled_server.params_files, strict=True):
        history = server.get("metrics/get-history", run_id=run_id, metric_key="epoch/val/neg_elbo")
        assert len(history["metrics"]) == params_mod.load(params_file).train.epochs

    expect = sync_api.expect
    screenshots = []
    page = new_page(browser)
    try:

        def shoot(name: str) -> None:
            path = tmp_path / f"{name}.png"
            page.screenshot(path=path, full_page=True)
            screenshots.append(path)
            print(f"screenshot: {path}")

        # The experiment's runs table (its bare URL opens the GenAI overview in MLflow 3).
        page.goto(f"{server.url}/#/experiments/{filled_server.experiment_id}/runs")
        try:
            for name in names:
                expect(page.get_by_role("link", name=name, exact=True)).to_be_visible(
                    timeout=UI_TIMEOUT_MS
                )
            expect(page.get_by_text("2 matching runs")).to_be_visible()
        finally:
            shoot("experiment_runs")

        page.goto(compare_url(server.url, ids, filled_server.experiment_id))
        try:
            expect(page.get_by_text("Comparing 2 Runs from 1 Experiment")).to_be_visible(
                timeout=UI_TIMEOUT_MS
            )
            for name in names:
                expect(page.get_by_text(name, exact=True).first).to_be_visible()
            # The params table: evaluate.seed is 0 for the first run, 1 for eval-seed-1
            # (the columns follow the order of the URL's run ids).
            seed_row = page.locator("tr").filter(has=page.get_by_text("evaluate.seed", exact=True))
            expect(seed_row).to_have_count(1)
            cells = [c.strip() for c in seed_row.locator("td").all_inner_texts()]
            assert cells[-2:] == ["0", "1"], cells
            expect(page.get_by_text("model.latent_dims", exact=True)).to_be_visible()
            # Metrics with each run's value: a per-epoch one far down the grid (the same for
            # both runs: one training) and an evaluation one that the seed changes.
            for metric in ("epoch/val/neg_elbo", "eval/test/neg_elbo"):
                shown = [float(text) for text in metric_values(page, metric)]
                latest = [latest_metric(run, metric) for run in runs]
                assert shown == pytest.approx(latest, rel=2e-3), (metric, shown, latest)
            evaluated = [latest_metric(run, "eval/test/neg_elbo") for run in runs]
            assert evaluated[0] != evaluated[1]  # so the columns' order is checked too
        finally:
            shoot("compare_runs")
    finally:
        page.close()
    assert all(path.stat().st_size > 10_000 for path in screenshots), screenshots


def first_chart_sections(page, count: int) -> list[str]:  # a playwright Page
    """The names of the first ``count`` chart sections, top to bottom, once they are drawn
    (each section header is its name followed by its chart count, e.g. "epoch/val" "(3)")."""
    pattern = re.compile(r"^[\w./]+$")
    headers = page.get_by_role("button", name="Add chart")
    expect = sync_api.expect
    expect(headers.nth(count - 1)).to_be_visible()
    sections = page.evaluate(
        """() => Array.from(document.querySelectorAll('*'))
            .filter(e => e.children.length === 0)
            .filter(e => /^\\(\\d+\\)$/.test((e.textContent || '').trim()))
            .map(e => (e.parentElement.innerText || '').split('\\n')[0].trim())"""
    )
    names = [name for name in sections if pattern.match(name)]
    return names[:count]


def test_the_make_ui_link_opens_runs_with_models_datasets_and_curves_first(
    browser, filled_server, tmp_path: Path
):
    """The link `make ui` prints (tracking.ui.ui_link) opens the runs table in the Model training
    view with each run's datasets and logged model in the Dataset and Models columns; a run's
    Model metrics tab and the runs' chart view then start with the per-epoch curves (their
    `epoch/...` names sort first, docs/tracking.md)."""
    from vaelab.tracking.ui import ui_link

    server, runs = filled_server.server, filled_server.runs
    experiment = server.get("experiments/get", experiment_id=filled_server.experiment_id)
    link = ui_link(server.url, server.url, experiment["experiment"]["name"])
    assert link.endswith("/runs?workflowType=machine_learning"), link
    # What the columns must show, through REST: each run's datasets and its logged model.
    datasets = sorted(
        f"{d['dataset']['name']} ({d['dataset']['digest']})"
        for run in runs
        for d in run["inputs"]["dataset_inputs"]
    )
    assert len(datasets) == 6, datasets  # training, validation and test sets of two runs
    model_names = [
        server.get("logged-models/" + run["outputs"]["model_outputs"][0]["model_id"])["model"][
            "info"
        ]["name"]
        for run in runs
    ]
    expect = sync_api.expect
    page = new_page(browser)
    try:
        page.goto(link)
        try:
            for run in runs:
                name = run["info"]["run_name"]
                expect(page.get_by_role("link", name=name, exact=True)).to_be_visible()
            cell = '[role=gridcell][col-id="attributes.`{}`"]'
            expect(page.locator(cell.format("Models")).first).to_be_visible()
            shown_models = page.locator(cell.format("Models")).all_inner_texts()
            assert sorted(shown_models) == sorted(model_names), shown_models
            shown_datasets = page.get_by_test_id("open-dataset-drawer").all_inner_texts()
            assert sorted(shown_datasets) == datasets, shown_datasets
        finally:
            page.screenshot(path=tmp_path / "ui_link_runs.png", full_page=True)
            print(f"screenshot: {tmp_path / 'ui_link_runs.png'}")

        run = runs[0]
        page.goto(
            f"{server.url}/#/experiments/{filled_server.experiment_id}/runs/"
            f"{run['info']['run_id']}/model-metrics"
        )
        try:
            assert first_chart_sections(page, 3) == [
                "epoch/train",
                "epoch/val",
                "eval/latent",
            ]
            # The validation negative ELBO curve, a line over the epochs, is in the first screen.
            legend = f"{run['info']['run_name']} (epoch/val/neg_elbo)"
            expect(page.get_by_text(legend, exact=True).first).to_be_in_viewport()
        finally:
            page.screenshot(path=tmp_path / "ui_model_metrics.png")
            print(f"screenshot: {tmp_path / 'ui_model_metrics.png'}")

        page.goto(f"{link}&compareRunsMode=CHART")
        try:
            assert first_chart_sections(page, 3) == [
                "epoch/train",
                "epoch/val",
                "eval/latent",
            ]
        finally:
            page.screenshot(path=tmp_path / "ui_runs_charts.png")
            print(f"screenshot: {tmp_path / 'ui_runs_charts.png'}")
    finally:
        page.close()


def test_group_by_the_config_tag_shows_one_row_per_configuration(
    browser, filled_server, tmp_path: Path
):
    """The steps of docs/comparing.md: the runs table, Group by, the tag vaelab.config. The two
    runs of the shared server differ only in evaluate.seed: one configuration, one group row of
    2 runs named after the id REST gives, both runs under it."""
    server, runs = filled_server.server, filled_server.runs
    configs = {
        next(t["value"] for t in run["data"]["tags"] if t["key"] == "vaelab.config")
        for run in runs
    }
    assert len(configs) == 1, configs  # evaluate.seed is a seed: the same configuration
    (config,) = configs
    expect = sync_api.expect
    page = new_page(browser)
    try:
        page.goto(
            f"{server.url}/#/experiments/{filled_server.experiment_id}/runs"
            "?workflowType=machine_learning"
        )
        try:
            expect(page.get_by_role("link", name=runs[0]["info"]["run_name"])).to_be_visible()
            page.get_by_role("button", name="Group by").first.click()
            page.get_by_text("vaelab.config", exact=True).last.click()
            page.keyboard.press("Escape")
            group = page.get_by_text(f"Group: {config}", exact=True)
            expect(group).to_be_visible()
            row = page.locator("[role=row]").filter(has=group)
            # The group's name, then its count of runs.
            expect(row).to_contain_text(re.compile(rf"Group: {config}\s*2(\D|$)"))
            for run in runs:
                name = run["info"]["run_name"]
                expect(page.get_by_role("link", name=name, exact=True)).to_be_visible()
        finally:
            page.screenshot(path=tmp_path / "ui_group_by_config.png")
            print(f"screenshot: {tmp_path / 'ui_group_by_config.png'}")
    finally:
        page.close()
