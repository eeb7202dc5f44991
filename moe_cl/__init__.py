"""moe-cl: Mixture-of-Experts continual learning on PyTorch and Avalanche."""

__version__ = "0.1.0"
