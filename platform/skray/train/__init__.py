"""Training on Ray Train, sweeps on Ray Tune, evaluation and run comparison."""
