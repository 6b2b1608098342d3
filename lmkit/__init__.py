"""lmkit: train, sample and evaluate small language models from the shell or from Python."""

__version__ = "0.1.0"
