"""One module per fine-tuning task: model builder, batch -> tensors, metrics."""
