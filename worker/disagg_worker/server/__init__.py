"""gRPC and HTTP servers of a worker process, and the peer pools they talk to."""
