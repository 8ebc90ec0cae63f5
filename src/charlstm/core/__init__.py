"""The core layer: torch only. The vocabulary, the network, checkpoint loading (weights_only), sampling and
fine-tuning's weight transfer; errors and atomic file writes. Imports nothing above it."""
