"""The redundant HTTP/1.1 reverse proxies in front of every app: a sans-IO core (`h1`,
`bodies`, `forward`, `routing`, `pages`: no I/O, no eventlet) and an eventlet shell that only
moves bytes (`tally serve balancer`)."""
