"""The network every NeMo ASR family shares: NeMo's mel front end and the FastConformer encoder."""
