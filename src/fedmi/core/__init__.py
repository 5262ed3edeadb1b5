"""Core engine: parameters, the types that cross the client/server boundary, the round loop."""
