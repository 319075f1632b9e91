"""vidgen: train causal video VAEs and video DiTs."""
__version__ = "0.1.0"
