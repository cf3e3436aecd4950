"""The MLflow model every complete run carries (``vaelab.serving``), logged by ``record`` and
found again by the registry through the run's ``vaelab.model_uri`` tag."""

from __future__ import annotations

from pathlib import Path

from vaelab.tracking.store import tracking_uri

MODEL_TAG = "vaelab.model_uri"


def log_model(client, run_id: str, weights: Path) -> str:
    """Log ``weights`` as the run's MLflow model (``vaelab.serving``: a pyfunc from pixels to
    latent means, with signature and input example, carrying this package as its code so that
    it loads without vaelab installed); return its model id. The run stays RUNNING."""
    import mlflow

    from vaelab import serving
    from vaelab.model import load

    mlflow.set_tracking_uri(tracking_uri())
    latent_dims = load(weights).latent_dims
    # The fluent API logs into the active run; ending it would mark the run FINISHED before
    # record has set its fingerprint, so the status is put back.
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(
            # Not "model": the run's artifact folder model/ holds the weights file, and MLflow
            # would resolve runs:/<id>/model to both.
            name="vae",
            python_model=serving.LatentMeans(),
            artifacts={"weights": str(weights)},
            code_paths=[str(Path(serving.__file__).parent)],
            signature=serving.signature(latent_dims),
            input_example=serving.input_example(),
            pip_requirements=_requirements(),
        )
    client.update_run(run_id, status="RUNNING")
    client.set_tag(run_id, MODEL_TAG, info.model_uri)
    print(f"record: MLflow model {info.model_uri}")
    return info.model_id


def _requirements() -> list[str]:
    """What the model needs where it is loaded (vaelab itself travels as its code)."""
    from importlib.metadata import version

    return [f"{name}=={version(name)}" for name in ("mlflow", "torch", "numpy")]
