"""The model behind a Ray Serve HTTP endpoint: the contract, the app and ``skray serve``."""
