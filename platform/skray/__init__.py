"""skray: SK-ResNeXt-50 on Ray — bulk labeling, training, sweeps and serving."""

__version__ = "0.1.0"
