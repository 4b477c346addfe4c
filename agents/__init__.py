"""Daemons that act: the placer (decides placements), host agents (run app processes),
the log collector, one-off runs and add-ons. They read the ledger and append what they
decide or observe; they never write views."""
