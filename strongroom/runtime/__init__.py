"""Service runtime shared by every Strongroom service: configuration, logging, errors, gRPC server."""
