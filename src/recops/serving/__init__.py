"""Online serving: the A/B router's sticky user-to-arm assignment and the pieces around Triton."""
