"""Building blocks of ``recops demo``: simulated users against the router, and the demo report."""
