"""The attention encoder-decoder head (Canary): Transformer decoder, prompts, beam and greedy search."""
