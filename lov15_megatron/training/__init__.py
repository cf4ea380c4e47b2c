"""Training components: model/optimizer set-up, the step, checkpointing, data."""
