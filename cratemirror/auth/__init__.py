"""Who may use the mirror: client tokens (cargo's RFC 3139), their file and the request check."""
