"""Tools over a Generator: bench, doctor, parity."""
