"""The application builder named by `import_path` in serve_config.yaml: `serve_app.app:build_app`.

No `from __future__ import annotations` here: Serve reads `build_app`'s annotation at run time to validate
the YAML's `args` into `AppArgs`, and a string annotation would hand it a plain dict.
"""

from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ConfigDict
from ray.serve import Application

from deployments.config import ClassifierConfig, IngressConfig, PreprocessorConfig
from serve_app.ingress import Ingress


class AppArgs(BaseModel):
    """Starting settings of each stage, validated before anything starts. A deployment's `user_config` in
    serve_config.yaml overrides its section, and `serve deploy` changes it in place."""

    model_config = ConfigDict(extra="forbid")

    ingress: IngressConfig = IngressConfig()
    preprocessor: PreprocessorConfig = PreprocessorConfig()
    classifier: ClassifierConfig = ClassifierConfig()


def build_app(args: AppArgs) -> Application:
    return compose(args)


def compose(args: AppArgs, backend_factory: Callable[[Any], Any] | None = None) -> Application:
    """Ingress -> Preprocessor and Classifier. `backend_factory`: what runs the Classifier's forward pass instead of
    the model's backend, called with each model's weights (the benchmarks' devices, load/devices.py)."""
    # The model's stages are imported where the application is built, not with this module: everything under
    # serve_app/ loads without torch, as every Ingress replica does.
    from deployments.classifier import Classifier
    from deployments.preprocessor import Preprocessor

    return Ingress.options(user_config=args.ingress.model_dump()).bind(
        Preprocessor.options(user_config=args.preprocessor.model_dump()).bind(),
        Classifier.options(user_config=args.classifier.model_dump()).bind(backend_factory),
    )
