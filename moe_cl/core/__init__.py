"""Pure-PyTorch core of moe-cl: expert bank, gates, mixture, losses, metrics, paper models.

Nothing here imports Avalanche, so the core can be read, tested and reused on its own.
"""
