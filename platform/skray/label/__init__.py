"""The bulk labeling job: plan, lease, the Ray Data pipeline, parts, manifest and its run."""
