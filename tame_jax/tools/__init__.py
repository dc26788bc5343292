"""Developer tools (fixture generation); not needed at run time."""
