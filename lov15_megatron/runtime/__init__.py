"""Process set-up (distributed, parallel state, seeds) and the explicit CPU backend."""
