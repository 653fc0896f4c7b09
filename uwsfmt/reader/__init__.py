"""The read side of a store: manifest, arrays, bases cache, rebuilding models and tensors."""
