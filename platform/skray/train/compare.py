"""``skray compare``: runs side by side, sorted by a metric, with plots.

Reads MLflow only, through :mod:`skray.weights.store`: the runs of an experiment, or the trials
nested under a sweep's parent run. The table is for the terminal; the PNGs are saved and
logged to the parent. Training runs and trials are shown by learning rate and weight decay
(a scatter coloured by the metric, learning curves of the best runs); labeling runs
(``skray-label``) by the model and weights that made the labels (a bar per run).

"Best" follows the mode: a sweep's own ``mode`` (recorded on its parent run), else the
one given, else ``min`` for metrics named like a loss or an error and ``max`` otherwise.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from skray.io.config import ConfigError
from skray.weights import store

Mode = Literal["max", "min"]


def infer_mode(metric: str) -> Mode:
    """``min`` for a loss or an error (``train_loss``, ``val_error``), else ``max``."""
    return "min" if metric.lower().endswith(("loss", "error", "err")) else "max"


def resolve_mode(parent: str | None, metric: str, mode: str | None = None) -> Mode:
    """The given mode, else the sweep's (its parent run's ``sweep.mode`` when it ranked this
    metric), else :func:`infer_mode`."""
    if mode is not None:
        if mode not in ("max", "min"):
            raise ConfigError(f"mode must be max or min, not {mode!r}")
        return mode  # type: ignore[return-value]
    if parent:
        params = store.run_params(parent)
        if params.get("sweep.metric") == metric and params.get("sweep.mode") in ("max", "min"):
            return params["sweep.mode"]  # type: ignore[return-value]
    return infer_mode(metric)


def collect(
    experiment: str | None, parent: str | None, metric: str, mode: str | None = None
) -> list[dict[str, Any]]:
    """One row per run, best first by ``mode`` (see :func:`resolve_mode`); runs that never
    reported the metric last."""
    mode = resolve_mode(parent, metric, mode)
    pick = max if mode == "max" else min
    rows = []
    for run in store.search_runs(experiment or "skray-train", parent):
        curve = store.metric_history(run.info.run_id, metric)
        rows.append(
            {
                "run": run.info.run_name,
                "run_id": run.info.run_id,
                "lr": _number(run.data.params.get("optim.lr")),
                "weight_decay": _number(run.data.params.get("optim.weight_decay")),
                "epochs": len(curve),
                "best": pick(curve) if curve else None,
                "curve": curve,
                "state": run.data.tags.get(store.STATE_TAG, run.info.status.lower()),
                "params": run.data.params,
            }
        )
    sign = -1.0 if mode == "max" else 1.0
    return sorted(rows, key=lambda r: (r["best"] is None, sign * (r["best"] or 0.0)))


def _number(value: str | None) -> float | None:
    return None if value is None else float(value)


def is_training(rows: list[dict[str, Any]]) -> bool:
    """Training runs and trials have an optimizer; labeling runs do not."""
    return any(r["lr"] is not None for r in rows)


def _columns(rows: list[dict[str, Any]]) -> list[tuple[str, int, Any]]:
    """(header, width, cell) of the columns that describe these runs."""
    if is_training(rows):
        return [
            ("lr", 9, lambda r: f"{r['lr']:.4g}" if r["lr"] is not None else "-"),
            (
                "weight_decay",
                12,
                lambda r: f"{r['weight_decay']:.3g}" if r["weight_decay"] is not None else "-",
            ),
            ("epochs", 6, lambda r: str(r["epochs"])),
        ]
    return [
        (name, width, lambda r, name=name, width=width: _param(r, name)[:width])
        for name, width in (("model", 22), ("weights_version", 15), ("precision", 9))
    ]


def _param(row: dict[str, Any], name: str) -> str:
    """A param as the table shows it; MLflow keeps an unset (None) param as the text "None"."""
    value = row["params"].get(name)
    return "-" if value in (None, "", "None") else value


def format_table(rows: list[dict[str, Any]], metric: str) -> str:
    columns = _columns(rows)
    header = f"{'run':<34} " + " ".join(f"{h:>{w}}" for h, w, _ in columns)
    header += f" {'best ' + metric:>14}  state"
    lines = [header, "-" * len(header)]
    for r in rows:
        best = f"{r['best']:.2f}" if r["best"] is not None else "-"
        cells = " ".join(f"{cell(r):>{w}}" for _, w, cell in columns)
        lines.append(f"{r['run'][:34]:<34} {cells} {best:>14}  {r['state']}")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], metric: str, out_dir: Path, top: int = 5) -> list[Path]:
    """Training: ``lr_wd.png`` and ``learning_curves.png``; labeling: ``runs.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    figures = (
        {
            "lr_wd.png": lr_wd(rows, metric),
            "learning_curves.png": learning_curves(rows, metric, top),
        }
        if is_training(rows)
        else {"runs.png": run_bars(rows, metric)}
    )
    paths = []
    for name, fig in figures.items():
        fig.savefig(out_dir / name, dpi=100, bbox_inches="tight")
        plt.close(fig)
        paths.append(out_dir / name)
    return paths


def lr_wd(rows: list[dict[str, Any]], metric: str):
    """The figure: each run at its learning rate and weight decay, coloured by its best value."""
    import matplotlib.pyplot as plt

    scored = [r for r in rows if r["best"] is not None and r["lr"] and r["weight_decay"]]
    fig, ax = plt.subplots(figsize=(6, 4.5))
    points = ax.scatter(
        [r["lr"] for r in scored],
        [r["weight_decay"] for r in scored],
        c=[r["best"] for r in scored],
        cmap="viridis",
        s=60,
        edgecolors="k",
    )
    if scored:  # a log axis needs a positive value to scale
        ax.set(xscale="log", yscale="log")
    ax.set(
        xlabel="learning rate", ylabel="weight decay", title=f"best {metric} by LR and weight decay"
    )
    fig.colorbar(points, ax=ax, label=metric)
    return fig


def run_bars(rows: list[dict[str, Any]], metric: str, top: int = 20):
    """The figure: one bar per run (best first, at most ``top``), named by run and model."""
    import matplotlib.pyplot as plt

    shown = [r for r in rows if r["best"] is not None][:top]
    fig, ax = plt.subplots(figsize=(7, 0.4 * len(shown) + 1.2))
    names = [f"{curve_label(r['run'])} ({r['params'].get('model', '-')})" for r in shown]
    ax.barh(names[::-1], [r["best"] for r in shown][::-1], color="#4c72b0")
    ax.set(xlabel=metric, title=f"{metric} by run" if shown else f"no run reported {metric}")
    return fig


def curve_label(run: str) -> str:
    """A run's name as a legend entry: matplotlib leaves out labels that start with ``_``,
    and Tune names trials after the trainable (``_trial_1a2b3_00000``)."""
    return run.lstrip("_")[-24:] or "run"


def learning_curves(rows: list[dict[str, Any]], metric: str, top: int = 5):
    """The figure: one labeled line per run for the ``top`` first rows with a curve (``rows``
    come best first), the legend naming each run and its best value."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [r for r in rows if r["curve"]][:top]
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for r in shown:
        ax.plot(
            range(len(r["curve"])),
            r["curve"],
            marker="o",
            label=f"{curve_label(r['run'])} ({r['best']:.4g})",
        )
    ax.set(
        xlabel="epoch",
        ylabel=metric,
        title=f"learning curves of the best {len(shown)} runs"
        if shown
        else f"no run reported {metric}",
    )
    if shown:
        ax.legend(fontsize=7, title=f"run (best {metric})", title_fontsize=7)
    return fig


def compare(
    experiment: str | None = None,
    parent: str | None = None,
    metric: str = "val_top1",
    out_dir: str | None = None,
    mode: str | None = None,
) -> tuple[list[dict[str, Any]], list[Path]]:
    store.configure()
    rows = collect(experiment, parent, metric, mode)
    target = Path(out_dir or Path(".skray") / "compare" / (parent or experiment or "skray-train"))
    paths = plot(rows, metric, target) if rows else []
    if parent:
        for path in paths:
            store.log_artifact(parent, path, "compare")
    return rows, paths
