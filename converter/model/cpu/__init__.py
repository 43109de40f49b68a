"""CPU speed and memory pieces: composed activations, widened half-precision products, mapped weights."""
