"""KV transfer between prefill and decode workers: chunk planning, encoding, and transports."""
