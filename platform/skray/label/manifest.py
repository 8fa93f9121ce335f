"""The manifest a completed run writes beside its parts, and the summary a person reads of it.

The manifest is written last: its presence says the output is complete. It counts what the
output holds (from the parts, whichever run wrote them), what this run did, with which
weights and config, and how fast.
"""

from __future__ import annotations

import json
from typing import Any

from skray.io.config import redact_values
from skray.io.storage import join, redact_uri
from skray.label.config import LabelConfig
from skray.label.plan import Plan
from skray.label.progress import STAGE_FIGURES, Progress
from skray.label.sinks import REPORT_DIR


def build_manifest(
    cfg: LabelConfig,
    plan: Plan,
    summary: dict[str, Any],
    weights: dict[str, Any],
    *,
    committed: int,
    progress: Progress,
    total_s: float,
    pipeline_s: float,
    mlflow_run: dict[str, str] | None,
    incomplete: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The manifest of a run of ``cfg`` that planned ``plan``: ``summary`` is
    :func:`skray.label.sinks.summarize_output` of the output once every part is written,
    ``weights`` the pinned weights' record, ``committed`` the parts this run wrote, and
    ``total_s`` / ``pipeline_s`` the seconds since the run / its pipeline started, and
    ``incomplete`` what storage faults left unread (:func:`skray.label.job.not_read`): then
    ``complete`` is false and a rerun finishes the output."""
    return {
        "output": redact_uri(cfg.output),
        "complete": incomplete is None,
        "incomplete": incomplete,
        "inputs": summary["rows"] - plan.removed_rows,
        "rows": summary["rows"],
        "labeled": summary["labeled"],
        "failed": summary["failed"],
        "failed_by_reason": summary["failed_by_reason"],
        "skipped_already_done": plan.committed_rows - plan.removed_rows,
        "retried_from_earlier_runs": sum(h.rows for h in plan.heal),
        "removed_from_input": plan.removed_rows,
        "units": {
            "total": summary["parts"],
            "skipped": plan.committed_parts,
            "committed": committed,
        },
        "duplicates": summary["rows"] - summary["distinct_keys"],
        "low_confidence": summary["low_confidence"],
        "top_labels": summary["top_labels"],
        **weights,
        **dict(zip(("precision", "precision_reason"), cfg.resolved_precision())),
        "timings": {
            "total_s": round(total_s, 3),
            "pipeline_s": round(pipeline_s, 3),
            "images_this_run": progress.done,
            "img_per_s": round(progress.rate, 3),
            "steady_img_per_s": round(progress.steady_rate, 3),
            **progress.stages.figures(),
            "progress": progress.samples,
        },
        "mlflow": mlflow_run,
        "config": redact_values(json.loads(cfg.model_dump_json())),
    }


def format_summary(manifest: dict[str, Any]) -> str:
    """The table a person reads at the end of a run."""
    timings = manifest["timings"]
    lines = [
        f"inputs              {manifest['inputs']}",
        f"labeled             {manifest['labeled']}",
        *(
            [
                f"low confidence      {manifest['low_confidence']} (top score under "
                f"{manifest['config'].get('min_score')}: no label)"
            ]
            if manifest.get("low_confidence")
            else []
        ),
        *(
            [
                f"INCOMPLETE          {gone['units']} units ({gone['keys']} keys) not read: "
                f"storage {', '.join(f'{r} x{n}' for r, n in gone['reasons'].items())}; "
                "rerun to finish"
            ]
            if (gone := manifest.get("incomplete"))
            else []
        ),
        f"failed              {manifest['failed']}",
        *(f"  {reason:<18}{count}" for reason, count in manifest["failed_by_reason"].items()),
        f"skipped (done)      {manifest['skipped_already_done']}",
        *(
            [f"retried             {retried} (storage errors of earlier runs)"]
            if (retried := manifest.get("retried_from_earlier_runs"))
            else []
        ),
        f"duplicates          {manifest['duplicates']}",
        f"img/s (this run)    {timings['img_per_s']}",
        *(
            f"  {shown.format(timings[key])}"
            for key, shown in STAGE_FIGURES.items()
            if key in timings
        ),
        f"wall time           {timings['total_s']} s",
        f"model               {manifest['model']}"
        + (" (RANDOM weights: labels are meaningless)" if manifest["random_weights"] else ""),
        "most frequent labels:",
        *(f"  {count:>6}  {label}" for label, count in manifest["top_labels"]),
        f"Parquet             {manifest['output']}",
        f"report              {join(manifest['output'], REPORT_DIR)}/index.html",
        *(
            [f"MLflow run          {run['run_id']} (experiment {run['experiment']})"]
            if (run := manifest.get("mlflow"))
            else []
        ),
    ]
    return "\n".join(lines)
