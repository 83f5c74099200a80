"""Checkpoint I/O in the Hugging Face layout: the hub, the readers, the PreTrainedModel base."""
