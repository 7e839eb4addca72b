"""Job records in Redis: the key schema and the store, shared by the engine and the control plane."""
