"""Online classification on Ray Serve, read as in Ray's ``serve/doc_code/app_builder.py``:
typed args (:class:`skray.serve.config.ServeConfig`) -> builder (:func:`application`) ->
``.bind()`` of the replica (:class:`skray.serve.replica.ClassifierDeployment`). ``build_app`` is
the builder for ``serve run`` / ``serve deploy`` (``import_path: skray.serve.app:build_app``);
``skray serve`` (:mod:`skray.serve.launch`) reads the same config file.
"""

from __future__ import annotations

from typing import Any

from ray.serve.deployment import Application

from skray.io.config import deep_merge, resolve_gpus, validate
from skray.serve.config import ServeConfig
from skray.serve.replica import ClassifierDeployment
from skray.weights.resolver import pin_weights

IMPORT_PATH = "skray.serve.app:build_app"


def application(cfg: ServeConfig, **deployment_options: Any) -> Application:
    """The Serve application for ``cfg``; ``deployment_options`` (autoscaling, ...) as in a
    config file.

    The weights are pinned here, once: an alias moved or a file replaced later cannot give
    replicas started by autoscaling or recovery another model.
    """
    pinned = pin_weights(cfg.weights, cfg.model)
    actor_options: dict[str, Any] = {
        "num_cpus": cfg.cpus_per_replica,
        "num_gpus": resolve_gpus(cfg.gpus_per_replica),
    }
    options = {
        "max_ongoing_requests": 4 * cfg.max_batch_size,
        **deployment_options,
        "ray_actor_options": deep_merge(
            actor_options, deployment_options.get("ray_actor_options") or {}
        ),
    }
    return ClassifierDeployment.options(**options).bind(
        cfg.model_dump(), pinned.to_dict() if pinned else None
    )


def build_app(args: dict[str, Any]) -> Application:
    """Serve's application builder (``import_path: skray.serve.app:build_app``): ``args`` is a
    :class:`ServeConfig`."""
    return application(validate(ServeConfig, dict(args), source="serve args"))
