"""Configuration: the typed, validated config (schema.py), the named presets, and the user-facing errors.

The bottom of train/: imports nothing else of train/ at module level (worlds/ for the world section).
"""
