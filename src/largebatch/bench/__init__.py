"""Optimizer-step benchmark: our Lamb/Lars vs fused AdamW and peer libraries, in one run."""
