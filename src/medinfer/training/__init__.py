"""medinfer.training: scripts support for the bundled demo models (synthetic data, training loops)."""
