"""Teacher activations -> Filter Activation Network (FAN) -> communities -> K filter groups."""
