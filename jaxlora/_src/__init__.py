"""jaxlora's implementation. Import from `jaxlora` (and its public modules), not from here: these names may move."""
