"""``make demo``: the labeling job end to end on the embedded default.

Starts an S3 server and a Ray head on 127.0.0.1, writes a sample dataset (image
files, WebDataset shards and a few broken files) to a bucket, submits the job
with ``ray job submit``, prints the summary and stops what it started. The run is
recorded in the project's MLflow store (``.skray/mlflow``, unless ``$SKRAY_HOME`` or
``$MLFLOW_TRACKING_URI`` say otherwise), and its report, which lives on the S3 server
that stops, is written again under ``.skray/demo/report`` for a browser to open.
"""

from __future__ import annotations

import os
from pathlib import Path

from skray.dev.embedded import EmbeddedS3, LocalRayHead
from skray.dev.testing import write_sample_dataset
from skray.io.storage import join, read_json
from skray.label.manifest import format_summary
from skray.label.sinks import MANIFEST
from skray.report.page import write_report


def run_demo(model: str, bucket: str = "skray-demo") -> int:
    project = Path.cwd()
    if not (project / "pipelines" / "label.py").is_file():
        raise SystemExit("run the demo from the project root (where pipelines/ and configs/ are)")
    with EmbeddedS3() as s3:
        os.environ.update(s3.env())
        s3.create_bucket(bucket)
        data, labels = f"s3://{bucket}/data", f"s3://{bucket}/labels"
        keys = write_sample_dataset(data)
        print(f"[demo] S3 server on {s3.endpoint_url}: wrote {len(keys)} sample inputs to {data}/")
        home = {
            "SKRAY_HOME": os.environ.get("SKRAY_HOME") or str(project / ".skray")
        }  # the job's cwd is a copy
        with LocalRayHead(num_cpus=4, env={**s3.env(), **home}) as head:
            print(f"[demo] Ray head at {head.address} (token auth on); submitting the labeling job")
            job = head.submit(
                [
                    "python",
                    "pipelines/label.py",
                    "--config",
                    "configs/label.yaml",
                    "--set",
                    f"input={data}/",
                    "--set",
                    f"output={labels}/",
                    "--set",
                    f"model={model}",
                    "--set",
                    "actors.threads=2",
                ],
                working_dir=str(project),
                capture=False,
            )
        manifest = read_json(join(labels, MANIFEST))
        if job.returncode != 0 or manifest is None:
            print(f"[demo] the job failed (exit {job.returncode})")
            return 1
        print("\n[demo] summary (read back from " + join(labels, MANIFEST) + "):")
        print(format_summary(manifest))
        report = write_report(labels, dest=str(Path(home["SKRAY_HOME"]) / "demo" / "report"))
    print("[demo] the S3 server and Ray head are stopped; nothing is left running")
    print(f"[demo] report: {report}")
    return 0
