"""TEST STAND-IN for transformers.utils - NOT transformers' code (see hf_standin/README.md)."""
