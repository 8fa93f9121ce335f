"""Which weights a model runs with: the file formats, the MLflow store and the resolver."""
