"""The Ray-free library: the model, its classes, the one preprocessing path and batch decode.

Importing it loads no Ray and no MLflow, so a notebook, a test or a Serve replica's hot path
can use the model alone.
"""
