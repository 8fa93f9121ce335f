"""``skray serve``: deploy the classifier from the same Serve config file as ``serve run``.

The file is checked with Serve's own schema and the application's ``args`` with
:class:`skray.serve.config.ServeConfig`, flags and ``--set`` on top, before anything starts;
then it runs on Ray until SIGINT/SIGTERM.
"""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

from ray import serve

from skray.io.config import ConfigError, deep_merge, parse_overrides, read_yaml, validate
from skray.io.storage import LOOPBACK
from skray.serve.app import IMPORT_PATH, application
from skray.serve.config import ServeConfig
from skray.serve.replica import DEPLOYMENT


@dataclass
class Launch:
    """What ``skray serve`` deploys, resolved from a Serve config file and the command line."""

    config: ServeConfig
    name: str = "skray"
    route_prefix: str = "/"
    http_options: dict[str, Any] = field(default_factory=lambda: {"host": LOOPBACK, "port": 8000})
    deployment_options: dict[str, Any] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://{self.http_options['host']}:{self.http_options['port']}{self.route_prefix.rstrip('/')}"


def resolve_launch(
    path: str | None,
    app: str | None = None,
    overrides: Sequence[str] = (),
    args: dict[str, Any] | None = None,
    http: dict[str, Any] | None = None,
) -> Launch:
    """Validate the file with Serve's own schema and the app's ``args`` with :class:`ServeConfig`;
    ``args`` (flags) and then ``overrides`` (``--set``) apply on top. Fails naming the key."""
    data = (
        read_yaml(path)
        if path
        else {"applications": [{"name": "skray", "import_path": IMPORT_PATH}]}
    )
    source = path or "skray serve"
    if path:
        from ray.serve.schema import ServeDeploySchema

        try:
            ServeDeploySchema.parse_obj(data)
        except Exception as err:  # noqa: BLE001 - Serve's pydantic-v1 errors, shown as they are
            raise ConfigError(f"invalid Serve config {path}:\n{err}") from None
    apps = data.get("applications") or []
    chosen = [a for a in apps if app in (None, a.get("name"))]
    if len(chosen) != 1:
        names = ", ".join(a.get("name", "default") for a in apps) or "none"
        raise ConfigError(f"{source}: choose one application with --app (have: {names})")
    entry = chosen[0]
    name = entry.get("name", "default")
    if entry.get("import_path") != IMPORT_PATH:
        raise ConfigError(f"{source}: applications.{name}.import_path must be {IMPORT_PATH}")
    deployments = entry.get("deployments") or []
    unknown = [d.get("name") for d in deployments if d.get("name") != DEPLOYMENT]
    if unknown:
        raise ConfigError(
            f"{source}: unknown deployment(s) {unknown}; this application has {DEPLOYMENT!r}"
        )
    merged = deep_merge(deep_merge(entry.get("args") or {}, args or {}), parse_overrides(overrides))
    cfg = validate(ServeConfig, merged, source=f"{source} applications.{name}.args")
    return Launch(
        cfg,
        name,
        entry.get("route_prefix", "/"),
        {"host": LOOPBACK, "port": 8000, **(data.get("http_options") or {}), **(http or {})},
        {k: v for d in deployments for k, v in d.items() if k != "name"},
    )


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def serve_forever(launch: Launch, address: str | None = None) -> None:
    """Deploy on the Ray at ``address`` (or ``RAY_ADDRESS``, else a new local one) until
    SIGINT/SIGTERM, then delete the application."""
    import ray

    ray.init(
        address=address, logging_level="WARNING"
    )  # a new local Ray has token auth on by default
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        serve.start(http_options=launch.http_options)
        serve.run(
            application(launch.config, **launch.deployment_options),
            name=launch.name,
            route_prefix=launch.route_prefix,
        )
        print(
            f"[serve] {launch.name}: {launch.config.model or 'model from weights'} "
            f"at {launch.url}/v1/classify (docs {launch.url}/docs); Ctrl-C stops it",
            flush=True,
        )
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print(f"[serve] stopping {launch.name}", flush=True)
    finally:
        serve.delete(launch.name)
        ray.shutdown()
