"""What the engine and evaluation both stand on: process groups and checkpoints."""
