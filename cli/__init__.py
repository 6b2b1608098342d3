"""lmkit's command line: one thin module per subcommand that parses, calls the library, and prints."""
