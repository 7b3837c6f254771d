"""TEST STAND-IN for transformers.models - NOT transformers' code."""
