"""Matplotlib figures (imported lazily by the CLI and examples; Agg backend)."""
