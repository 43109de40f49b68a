"""The application around the networks: reading audio, batching clips, long audio, transcripts."""
