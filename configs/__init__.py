"""Model-family presets (YAML), shipped as package data."""
