"""Composition root: configuration, the `tally` command line, `tally up`."""
