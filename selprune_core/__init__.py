"""selprune_core: selective pruning (Pochinkov & Schoots) as a plain library."""
