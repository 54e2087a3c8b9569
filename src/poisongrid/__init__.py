"""poisongrid: simultaneous backdoor-poisoning experiment grids."""

__version__ = "0.1.0"
