"""The bundled MLX Canary model: MLX and numpy only, never torch or NeMo."""
