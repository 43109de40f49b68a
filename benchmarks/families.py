"""NeMo checkpoints with the real shapes of each Canary family (random weights), for `make bench`.

Layer counts and widths are the real ones (shared/docs/canary-reference.md). Vocabularies are
approximated: the factory trains two languages (en, de) on made-up words instead of four or 25 real
ones, with each sub-tokenizer sized so the total is close to the real vocabulary.
"""

from __future__ import annotations

from dataclasses import replace

from factory import TinyCTCSpec, TinySpec

# Common to the family: 128 mels, dw_striding x8 with 256 channels, 8 heads, conv kernel 9, FF x4,
# decoder inner 4 x hidden, untied position biases, no xscaling.
_COMMON = TinySpec("common", features=128, enc_heads=8, dec_heads=8, subsampling_factor=8, conv_channels=256,
                   conv_kernel=9, ff_expansion=4, dec_inner_factor=4, xscaling=False, untie_biases=True)

FAMILIES = {
    # canary-1b: 4 languages x 1024 pieces plus special tokens; here 2 x 2048.
    "canary-1b": replace(_COMMON, name="canary-1b", prompt_format="canary", d_model=1024, dec_hidden=1024,
                         enc_layers=24, dec_layers=24, max_sequence_length=512, text_vocab=2048),
    # canary-1b-flash and canary-180m-flash: 5248 rows (1152 special + 4 x 1024); here 2 x 2612 plus specials.
    "canary-1b-flash": replace(_COMMON, name="canary-1b-flash", prompt_format="canary2", d_model=1024,
                               dec_hidden=1024, enc_layers=32, dec_layers=4, max_sequence_length=1024,
                               text_vocab=2612),
    "canary-180m-flash": replace(_COMMON, name="canary-180m-flash", prompt_format="canary2", d_model=512,
                                 dec_hidden=1024, enc_layers=17, dec_layers=4, max_sequence_length=1024,
                                 text_vocab=2612),
    # canary-1b-v2: one SentencePiece model of 16384 pieces (25 languages); here 2 languages.
    "canary-1b-v2": replace(_COMMON, name="canary-1b-v2", prompt_format="canary2", tokenizer="bpe", d_model=1024,
                            dec_hidden=1024, enc_layers=32, dec_layers=8, max_sequence_length=1024,
                            text_vocab=16300),
}

# canary-1b-v2 with the timestamp aligner its `.nemo` packs (`timestamps_asr_model_*`). The release's own
# aligner config is not public here (the Hub is out of reach); what is: NVIDIA's Canary-1B-v2 report (arXiv
# 2509.14128, section 5: NeMo Forced Aligner "with an auxiliary CTC model") and a public extraction of that
# member (huggingface.co/cstr/canary-ctc-aligner-GGUF: a 600M-parameter Parakeet-style FastConformer with a
# CTC head, trained with the Canary's own 16384-piece SentencePiece tokenizer). Assumed from that: the encoder
# of NVIDIA's 600M Parakeets (parakeet-tdt-0.6b-v3: FastConformer XL, 24 layers of 1024, 8 heads, 128 mels,
# dw_striding x8 with 256 channels, conv kernel 9, FF x4, xscaling as NeMo's FastConformer configs set it)
# and a 1x1 conv head over the Canary's vocabulary plus the blank.
ALIGNED = {
    "canary-1b-v2-aligner": ("canary-1b-v2", TinyCTCSpec("canary-1b-v2-aligner", features=128, d_model=1024,
                                                         enc_layers=24, enc_heads=8, subsampling_factor=8,
                                                         conv_channels=256, conv_kernel=9, ff_expansion=4,
                                                         xscaling=True, untie_biases=True, seed=20)),
}
