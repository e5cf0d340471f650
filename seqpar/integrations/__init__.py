"""Integrations with model libraries: `seqpar.integrations.hf` (transformers) and
`seqpar.integrations.deepspeed`. Each is imported on its own, so neither library is needed
unless its integration is used."""
