"""Tools that drive a whole stack from outside: the demo and its simulated shop, the
benchmarks, the chaos and soak runs, and the probes they look at the stack with."""
