"""The latent explorer page in a real headless Chromium (the setup of test_ui_browser.py), with
every network request refused: the image under the pointer is vaelab's own decode of the latent
point there, a click on a test point shows that test image, its label, its reconstruction and its
negative ELBO, and nothing logs an error. Then the page inside the MLflow UI's artifact view.

Pages: the one `dvc repro` wrote for the fake-MNIST pipeline of ``filled_server`` (MLP), and one
written here for a conv model with three latent dimensions.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from tests import test_ui_browser
from vaelab.data import load_split
from vaelab.explorer import CLICKABLE, ELBO_SEED, write_explorer
from vaelab.model import VAE, images_to_float, load, per_image_terms

# test_ui_browser's marks: `browser`, and a skip with the reason when there is no chromium.
pytestmark = test_ui_browser.pytestmark
sync_api = pytest.importorskip(
    "playwright.sync_api", reason="playwright is not installed (pip install -e '.[dev]')"
)

MAX_PIXEL_DIFFERENCE = 0.02  # mean absolute, images in [0, 1] (the bound)
# Any one pixel: float16 weights and the canvas's 8 bits stay far below it; a wrong row or column
# (a decoder off by one pixel somewhere) does not, though it moves the mean little.
MAX_ONE_PIXEL = 0.05
# Where the pointer goes, as fractions of the plot box's width and height from its top left.
POINTER_FRACTIONS = [(0.2, 0.3), (0.5, 0.5), (0.75, 0.8), (0.9, 0.15)]
CLICK_CLEARANCE_PX = 9  # the page picks the nearest ringed point within 8 px of a click


class Watched:
    """A page whose every request other than file:// is refused and recorded, and whose console
    errors and uncaught exceptions are recorded."""

    def __init__(self, browser) -> None:
        self.page = test_ui_browser.new_page(browser, width=1300, height=900)
        self.refused: list[str] = []
        self.errors: list[str] = []
        self.page.route("**/*", self._route)
        self.page.on("console", self._console)
        self.page.on("pageerror", lambda error: self.errors.append(f"pageerror: {error}"))

    def _route(self, route) -> None:
        if route.request.url.startswith("file://"):
            route.continue_()
        else:
            self.refused.append(route.request.url)
            route.abort()

    def _console(self, message) -> None:
        if message.type == "error":
            self.errors.append(f"console: {message.text}")


def canvas_image(frame, selector: str) -> np.ndarray:
    """The 28x28 image an enlarged canvas shows, in [0, 1]: the grey of each cell's centre."""
    values = frame.evaluate(
        """selector => {
            const canvas = document.querySelector(selector), scale = canvas.width / 28;
            const data = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height);
            const out = [];
            for (let row = 0; row < 28; row++) for (let col = 0; col < 28; col++) {
                const x = Math.floor((col + 0.5) * scale), y = Math.floor((row + 0.5) * scale);
                out.push(data.data[4 * (y * canvas.width + x)]);
            }
            return out;
        }""",
        selector,
    )
    return np.array(values, dtype=np.float64).reshape(28, 28) / 255


@torch.inference_mode()
def decoded(model: VAE, z: torch.Tensor) -> np.ndarray:
    """vaelab's image of latent points z (N, latent): (N, 28, 28) in [0, 1]."""
    return torch.sigmoid(model.decode(z)).squeeze(1).double().numpy()


def axes(frame) -> tuple[dict, list[float], list[float]]:
    """The plot box (canvas pixels) and the latent range of each axis, as the page draws them."""
    return frame.evaluate("[window.explorer.box, window.explorer.x, window.explorer.y]")


def check_page(
    frame, mouse, offset: tuple[float, float], model: VAE, images, labels, likelihood: str
):
    """Pointer and click checks on a loaded explorer page in ``frame``; ``offset`` is the overlay
    canvas's top left in the mouse's coordinates. Returns the pixel differences measured."""
    frame.wait_for_function("window.explorer && window.explorer.ready")
    box, x_range, y_range = axes(frame)
    dims = frame.evaluate("window.explorer.dims")
    with torch.inference_mode():
        mu = model.encode(images_to_float(images))[0]  # (N, latent)
    plane = mu[:, dims].double().numpy()
    # Every test mean lies inside the axes.
    assert x_range[0] < plane[:, 0].min() and plane[:, 0].max() < x_range[1]
    assert y_range[0] < plane[:, 1].min() and plane[:, 1].max() < y_range[1]

    differences, shown_images = [], []
    for fx, fy in POINTER_FRACTIONS:
        aim = (box["left"] + fx * box["width"], box["top"] + fy * box["height"])
        mouse.move(offset[0] + aim[0], offset[1] + aim[1])
        # Chromium delivers the event at whole pixels (of the frame, inside an iframe): where it
        # landed on the canvas, within a pixel of the aim.
        landed = frame.evaluate("window.explorer.pointerPixel")
        assert landed == pytest.approx(aim, abs=1.0)
        # The latent point under the pointer, from the axes: x grows right, z2 grows up.
        fx = (landed[0] - box["left"]) / box["width"]
        fy = (landed[1] - box["top"]) / box["height"]
        z = torch.zeros(1, model.latent_dims)
        z[0, dims[0]] = x_range[0] + fx * (x_range[1] - x_range[0])
        z[0, dims[1]] = y_range[1] - fy * (y_range[1] - y_range[0])
        text = frame.locator("#ztext").inner_text()
        shown_z = [float(v) for v in re.findall(r"= (-?[\d.]+)", text)]
        assert shown_z == pytest.approx(z[0, dims].tolist(), abs=2e-3), text
        shown = canvas_image(frame, "#decoded")
        difference = np.abs(shown - decoded(model, z)[0])
        assert difference.max() < MAX_ONE_PIXEL, (difference.max(), z)
        differences.append(float(difference.mean()))
        shown_images.append(shown)
    assert max(differences) < MAX_PIXEL_DIFFERENCE, differences
    # The images differ from point to point more than from vaelab's: the check can fail.
    assert np.abs(shown_images[0] - shown_images[-1]).mean() > 5 * max(differences)

    # Click a test point no other ringed point is near (all these images are ringed).
    pixels = np.stack(
        [
            box["left"] + (plane[:, 0] - x_range[0]) / (x_range[1] - x_range[0]) * box["width"],
            box["top"] + (y_range[1] - plane[:, 1]) / (y_range[1] - y_range[0]) * box["height"],
        ],
        axis=1,
    )
    gaps = np.linalg.norm(pixels[:, None] - pixels[None], axis=2) + np.eye(len(pixels)) * 1e9
    index = int(np.argmax(gaps.min(axis=1) >= CLICK_CLEARANCE_PX))
    assert gaps[index].min() >= CLICK_CLEARANCE_PX, "no isolated test point to click"
    mouse.click(offset[0] + pixels[index, 0], offset[1] + pixels[index, 1])
    picked = frame.locator("#picked").inner_text()
    match = re.match(r"test image (\d+): digit (\d), negative ELBO (-?[\d.]+) nats", picked)
    assert match, picked
    assert (int(match[1]), int(match[2])) == (index, int(labels[index]))
    original = canvas_image(frame, "#original")
    assert np.abs(original - images[index].double().numpy() / 255).max() <= 1 / 255
    recon = canvas_image(frame, "#recon")
    recon_difference = np.abs(recon - decoded(model, mu[index : index + 1])[0])
    assert recon_difference.max() < MAX_ONE_PIXEL
    recon_difference = float(recon_difference.mean())
    assert recon_difference < MAX_PIXEL_DIFFERENCE
    # One posterior sample per image, for the embedded images together, as the page's are.
    terms = per_image_terms(
        model, images[:CLICKABLE], likelihood, torch.Generator().manual_seed(ELBO_SEED)
    )
    assert float(match[3]) == pytest.approx(float(terms.neg_elbo[index]), abs=0.01)
    return differences + [recon_difference]


def open_file(browser, path: Path, model, images, labels, likelihood: str) -> list[float]:
    watched = Watched(browser)
    page = watched.page
    try:
        page.goto(path.as_uri())
        overlay = page.locator("#overlay").bounding_box()
        differences = check_page(
            page.main_frame,
            page.mouse,
            (overlay["x"], overlay["y"]),
            model,
            images,
            labels,
            likelihood,
        )
        page.screenshot(path=path.with_suffix(".png"))
    finally:
        page.close()
    assert watched.refused == [] and watched.errors == []
    print(f"{path}: mean |page - vaelab| per image {[f'{d:.5f}' for d in differences]}")
    return differences


def test_pipeline_page_decodes_as_vaelab_offline(browser, filled_server):
    """The page `dvc repro` wrote (fake MNIST, the tiny MLP) with the model and test set of it."""
    repo = filled_server.repo
    images, labels = load_split(repo / "data" / "MNIST", train=False)
    model = load(repo / "models" / "vae.pt")
    page = repo / "reports" / "figures" / "latent_explorer.html"
    open_file(browser, page, model, images, labels, "gaussian")


def test_conv_page_with_three_latent_dims_decodes_as_vaelab(browser, fake_data_dir, tmp_path):
    """A conv model (its transposed convolutions run in the page); the plane is z1 and z3, the
    coordinates whose means vary most (z2's are shrunk), z2 held at 0."""
    images, labels = load_split(fake_data_dir, train=False)
    model = VAE(latent_dims=3, hidden=(8, 16), arch="conv").eval()
    with torch.no_grad():
        model.enc_head.weight[1] *= 0.01  # row 1 is mu's z2: its means barely vary
        for layer in (model.decoder[0], model.decoder[3], model.decoder[5]):
            layer.weight *= 3  # sharper images than an untrained net's flat grey
    path = tmp_path / "latent_explorer.html"
    write_explorer(model, images, labels, "bernoulli", ((-1.0, 0.0), (1.0, 0.0)), path)
    assert "z1 and z3 (largest variance of the test means), the other 1 coordinates at 0" in (
        path.read_text()
    )
    open_file(browser, path, model, images, labels, "bernoulli")


def test_the_page_works_in_the_mlflow_ui_artifact_view(browser, filled_server, tmp_path):
    """The run's figures/latent_explorer.html opened in the run page's artifact view: MLflow shows
    an HTML artifact in an iframe (a blob: URL, sandbox="allow-scripts"), where the page's script
    must run: the same pointer and click checks as offline."""
    server, run = filled_server.server, filled_server.runs[-1]
    run_id, repo = run["info"]["run_id"], filled_server.repo
    url = (
        f"{server.url}/#/experiments/{filled_server.experiment_id}/runs/{run_id}"
        "/artifacts/figures/latent_explorer.html"
    )
    page = test_ui_browser.new_page(browser, width=1600, height=1400)
    try:
        page.goto(url)
        # The UI builds the artifact view after its bundle has loaded and the run's artifacts
        # have been listed; on a busy 2-core machine that takes longer than expect's own 5 s.
        iframe = page.locator("iframe.mlflow-html-iframe")
        iframe.wait_for(state="attached", timeout=test_ui_browser.UI_TIMEOUT_MS)
        sync_api.expect(iframe).to_be_visible(timeout=test_ui_browser.UI_TIMEOUT_MS)
        frame = iframe.element_handle().content_frame()
        frame.wait_for_function("window.explorer && window.explorer.ready")
        assert frame.url.startswith("blob:"), frame.url
        assert "allow-scripts" in iframe.get_attribute("sandbox")
        overlay = frame.locator("#overlay")
        overlay.scroll_into_view_if_needed()
        position = overlay.bounding_box()
        images, labels = load_split(repo / "data" / "MNIST", train=False)
        differences = check_page(
            frame,
            page.mouse,
            (position["x"], position["y"]),
            load(repo / "models" / "vae.pt"),
            images,
            labels,
            "gaussian",
        )
        print(f"in the MLflow UI: mean |page - vaelab| per image {differences}")
    finally:
        page.screenshot(path=tmp_path / "mlflow_artifact_view.png", full_page=True)
        print(f"screenshot: {tmp_path / 'mlflow_artifact_view.png'}")
        page.close()
