"""The redundant eventlet HTTP/1.1 reverse proxies: a sans-IO HTTP core and routing table,
an eventlet shell. Not built yet (a later issue); `tally up` runs none so far."""
