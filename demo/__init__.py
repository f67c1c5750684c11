"""`cipherhive demo`: a real local federation (one server, three nodes) on real data."""
