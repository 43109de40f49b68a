"""Declarative key-mapping rules (YAML), shipped as package data."""
