"""Memory banks' domain code with no HTTP: decoding documents by mime type, chunking them
in token windows, and the shapes the service and the agents share."""
