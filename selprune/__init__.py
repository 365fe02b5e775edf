"""selprune: the command line, the HTTP client and the local-stack launcher."""
