"""Finding model weights and tokenizers: local directories, hub ids, and models shipped in packages."""
