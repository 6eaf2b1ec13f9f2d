"""Model loading, generation and the live (continually updated) model."""
