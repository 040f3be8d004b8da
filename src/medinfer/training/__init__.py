"""medinfer.training: support code for training the bundled demo models."""
