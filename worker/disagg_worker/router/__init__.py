"""The OpenAI-compatible router: admission, decode-worker choice, token streaming."""
