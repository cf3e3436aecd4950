"""The MLflow model every complete run carries: a pyfunc from pixels to posterior means that
loads and serves where vaelab is not installed (the model holds this package as its code,
``code_paths``, and the weights file ``models/vae.pt`` as an artifact).

    import mlflow
    model = mlflow.pyfunc.load_model("models:/m-...")   # the URI `record` prints
    means = model.predict(pixels)   # float32 in [0, 1], (N, 784) -> (N, latent)
    vae = model.unwrap_python_model().vae               # the torch module (vaelab.model.VAE)
    images = torch.sigmoid(vae.decode(z))               # latent (N, latent) -> (N, 1, 28, 28)

Only MLflow's loader and ``vaelab.tracking.models`` import this module.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from mlflow.models import ModelSignature
from mlflow.pyfunc import PythonModel
from mlflow.types.schema import Schema, TensorSpec

from vaelab.model import PIXELS, load


class LatentMeans(PythonModel):
    """``predict``: pixels -> E_q[z|x], the encoder's means, as float32 (N, latent)."""

    def load_context(self, context) -> None:  # mlflow.pyfunc.PythonModelContext
        self.vae = load(context.artifacts["weights"])  # eval mode, on the CPU

    # The input's type hint is what MLflow 3 reads (mlflow/pyfunc/model.py,
    # PythonModel.__init_subclass__): without one it warns "Add type hints to the `predict`
    # method" wherever this class is defined, i.e. in every `record` and every load. np.ndarray
    # is one of the hints it accepts without inferring a schema from them
    # (mlflow/types/type_hints.py, type_hints_no_signature_inference): the explicit tensor
    # signature below stays the model's, and MLflow wraps predict without validating the hint.
    def predict(
        self, context, model_input: np.ndarray, params: dict[str, Any] | None = None
    ) -> np.ndarray:
        pixels = np.asarray(model_input, dtype=np.float32)
        # (N, 784), as the signature says; MLflow refuses other shapes before predict.
        x = torch.from_numpy(pixels).reshape(-1, 1, 28, 28)
        with torch.inference_mode():
            return self.vae.encode(x)[0].numpy()


def signature(latent_dims: int) -> ModelSignature:
    """float32 pixels (N, 784) in, float32 means (N, latent_dims) out."""
    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, PIXELS))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, latent_dims))]),
    )


def input_example() -> np.ndarray:
    """Two images, (2, 784) float32: a blank one and a centred square."""
    images = np.zeros((2, 28, 28), dtype=np.float32)
    images[1, 9:19, 9:19] = 1.0
    return images.reshape(2, PIXELS)
