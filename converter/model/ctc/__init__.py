"""NeMo's CTC head (EncDecCTCModelBPE, and canary-1b-v2's timestamp aligner) on the shared FastConformer."""
