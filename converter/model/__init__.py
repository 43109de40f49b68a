"""The bundled MLX models: MLX and numpy only, never torch or NeMo.

`fastconformer/` is the front end and encoder every family shares, `aed/` the Canary decoder head, `app/`
what turns audio files into transcripts, `cpu/` the CPU speed and memory pieces; `config.py`, `load.py`,
`tokenizer.py` and `quantized.py` serve them all.
"""
