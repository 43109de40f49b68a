"""JSON Schemas of the files canary-convert writes for other tools (the verify report)."""
