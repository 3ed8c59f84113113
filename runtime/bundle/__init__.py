"""The bundle: manifest schema, graph I/O specs, loading with confinement and hashing, file I/O."""
