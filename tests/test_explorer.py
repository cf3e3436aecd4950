"""The latent explorer page without a browser: self-contained (nothing fetched) and under 3 MB for
the default architecture at the real test set's size, for 2 and 20 latent dimensions; the conv
decoder is written out layer by layer; a layer the page cannot run is refused.

In a browser: tests/test_explorer_browser.py.
"""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from vaelab.explorer import decoder_layers, explorer_html
from vaelab.model import VAE

LIMIT_BYTES = 3_000_000  # the limit for the default model
MNIST_TEST = 10_000  # the real test set: every one of its means is embedded
LINE = ((-2.5, 0.4), (2.0, 0.4))
# Any reference the browser could fetch: URLs, and the attributes and CSS that load something.
FETCHING = re.compile(r"https?://|//[a-z0-9.-]+\.[a-z]{2,}/|\bsrc\s*=|\bhref\s*=|url\(|@import")


def fake_test_set(count: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (count, 28, 28), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, 10, (count,), dtype=torch.uint8, generator=generator)
    return images, labels


@pytest.mark.parametrize("latent_dims", [2, 20])
def test_default_architecture_page_is_self_contained_and_under_the_limit(latent_dims):
    model = VAE(latent_dims=latent_dims)  # hidden (512,), relu: the default decoder's size
    images, labels = fake_test_set(MNIST_TEST)
    page = explorer_html(model, images, labels, "gaussian", LINE)
    size = len(page.encode("utf-8"))
    print(f"latent_dims {latent_dims}: {size} bytes")
    assert size <= LIMIT_BYTES
    assert FETCHING.findall(page) == []
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")


def test_the_reference_pattern_finds_what_a_browser_would_fetch():
    for fetching in (
        '<script src="x.js">',
        "<link href='a.css'>",
        "background: url(a.png)",
        "@import 'x.css'",
        "//cdn.example.com/x.js",
        "https://a.b",
    ):
        assert FETCHING.search(fetching), fetching


def test_conv_decoder_is_written_out_layer_by_layer():
    model = VAE(latent_dims=3, hidden=(8, 16), arch="conv", activation="tanh")
    layers, weights = decoder_layers(model)
    assert [layer["op"] for layer in layers] == [
        "linear",
        "tanh",
        "shape",
        "convT",
        "tanh",
        "convT",
    ]
    assert layers[2] == {"op": "shape", "channels": 16, "side": 7}
    first, last = layers[3], layers[5]
    assert (first["cin"], first["cout"], last["cin"], last["cout"]) == (16, 8, 8, 1)
    assert len(weights) == sum(p.numel() for p in model.decoder.parameters())
    # Every layer's weights are where its offsets say, in torch's order (float16).
    convolution = model.decoder[3]
    stored = torch.from_numpy(weights[first["w"] : first["w"] + convolution.weight.numel()])
    expected = convolution.weight.detach().flatten().half()
    assert torch.equal(stored, expected)


def test_a_layer_the_page_cannot_run_is_refused():
    model = VAE()
    model.decoder.append(nn.Sigmoid())
    with pytest.raises(ValueError, match="cannot run Sigmoid"):
        decoder_layers(model)
