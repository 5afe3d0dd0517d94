"""ML core of the sEMG platform: preprocessing, the gesture CNN, training and artifacts."""

__version__ = "0.1.0"
