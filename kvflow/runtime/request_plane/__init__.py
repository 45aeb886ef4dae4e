"""Request planes: tcp (default, framed msgpack streams) and nats."""
