"""TEST STAND-IN for transformers.integrations - NOT transformers' code."""
