"""From records to logical events: derivation (tracepoint backend) and recordings."""
