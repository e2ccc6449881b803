"""Batch-scaling studies: suites as data, a resumable runner, and the report."""
