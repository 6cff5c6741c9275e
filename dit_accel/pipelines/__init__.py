"""Model-family adapters (one module per family) and their registry in ``families``."""
