"""The speech-LLM families (canary-qwen): our audio half, the LLM run by mlx-lm."""
